"""Voice-clone text chunking and pauses (spec tts.md §7.2) against the golden chunking cases."""

import json
import time

import pytest

from conftest import import_module, shared_path

chunking = import_module("text_chunking")


@pytest.fixture(scope="module")
def golden_cases() -> list:
    cases = json.loads(shared_path("golden", "tts_tiny", "cases.json").read_text(encoding="utf-8"))
    return cases["text_chunking"]["cases"]


def _unpunctuated(text: str) -> str:
    return "".join(char for char in text if char not in chunking.SENTENCE_END_CHARS + chunking.CLAUSE_END_CHARS)


def test_prepared_text_matches_golden(golden_cases):
    for case in golden_cases:
        assert chunking.prepare_text_for_chunking(case["text"]) == case["prepared_text"], case["name"]


def test_chunks_match_golden(tokenizer, golden_cases):
    for case in golden_cases:
        chunks = chunking.split_text_into_chunks(tokenizer, case["text"], case["max_tokens"])
        assert chunks == case["chunks"], (case["name"], case["max_tokens"])
        counts = [chunking.count_tokens(tokenizer, chunk) for chunk in chunks]
        assert counts == case["chunk_token_counts"], (case["name"], case["max_tokens"])
        assert chunking.count_tokens(tokenizer, case["text"]) == case["text_token_count"], case["name"]


def test_short_text_prefix_never_reaches_a_chunk(tokenizer):
    assert chunking.prepare_text_for_chunking("hello there friend") == "        Hello there friend."
    assert chunking.split_text_into_chunks(tokenizer, "hello there friend", 50) == ["Hello there friend."]


def test_single_chunk_uses_the_original_text(tokenizer):
    text = "hello there\nfriend"
    assert chunking.voice_clone_text_chunks(tokenizer, text, 50) == [text]
    assert chunking.voice_clone_text_chunks(tokenizer, text, 0) == [text]
    long_text = "The first sentence is here. The second sentence follows it"
    assert chunking.voice_clone_text_chunks(tokenizer, long_text, 8) == [
        "The first sentence is here.",
        "The second sentence follows it.",
    ]


def test_sentences_keep_their_closing_marks():
    text = 'He said, "Stop!" Then he left. (Nobody knew.) 好的。」再见'
    expected = ['He said, "Stop!"', "Then he left.", "(Nobody knew.)", "好的。」", "再见"]
    assert chunking.split_sentences(text) == expected


def test_cjk_text_gets_a_full_stop_and_keeps_its_case():
    assert chunking.prepare_text_for_chunking("  你好\n世界  ") == "你好 世界。"
    assert chunking.prepare_text_for_chunking("你好？") == "你好？"
    assert chunking.prepare_text_for_chunking("one two three four five six") == "One two three four five six."


def test_long_clause_shortcut_cuts_like_the_full_search(tokenizer, golden_cases):
    """The probe shortcut for long clauses must not move any cut (compared with the plain binary search)."""
    names = {"long_english", "long_chinese", "korean", "very_long_single_word"}
    texts = {case["name"]: case["text"] for case in golden_cases if case["name"] in names}
    for name, text in sorted(texts.items()):
        clause = _unpunctuated(text * 3).strip()
        for max_tokens in (7, 50):
            fast = chunking.split_by_budget(tokenizer, clause, max_tokens, exact_max_chars=0)
            full = chunking.split_by_budget(tokenizer, clause, max_tokens, exact_max_chars=10**9)
            assert fast == full, (name, max_tokens)


def test_hundred_thousand_unpunctuated_characters_chunk_quickly(tokenizer):
    text = ("这是一段没有任何标点符号的中文文本它会一直持续下去" * 5000)[:100_000]
    start = time.perf_counter()
    chunks = chunking.split_text_into_chunks(tokenizer, text, 50)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"100k characters took {elapsed:.1f} s"
    assert "".join(chunks) == text + "。"
    assert max(chunking.count_tokens(tokenizer, chunk) for chunk in chunks) <= 50


def test_one_character_over_budget_still_makes_progress(tokenizer):
    chunks = chunking.split_text_into_chunks(tokenizer, "😀😀😀 😀😀", 1)
    assert "".join(chunks).replace(" ", "") == "😀😀😀😀😀"


@pytest.mark.parametrize("text", ["", "   \n\t ", None])
def test_empty_text_raises_value_error(text):
    with pytest.raises(ValueError, match="text"):
        chunking.prepare_text_for_chunking(text)
    with pytest.raises(ValueError, match="text"):
        chunking.voice_clone_text_chunks(None, text, 50)


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True])
def test_bad_budget_raises_value_error(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        chunking.split_text_into_chunks(None, "Some text here.", max_tokens)


def test_pause_is_longer_after_short_chunks():
    assert chunking.pause_seconds_after("one two three four") == pytest.approx(0.40)
    assert chunking.pause_seconds_after("one two three four five") == pytest.approx(0.24)
    assert chunking.pause_seconds_after("你好，世界。今天天气很好！") == pytest.approx(0.40)
    assert chunking.pause_samples("one two", 48000) == 19200
    assert chunking.pause_samples("one two three four five", 48000) == 11520
    assert chunking.pause_samples("one two three four five", 22050) == 5292


@pytest.mark.parametrize("rate", [0, -1, 48000.0])
def test_bad_sample_rate_raises_value_error(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        chunking.pause_samples("text", rate)
