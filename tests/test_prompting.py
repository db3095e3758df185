"""Prompt template ids and input rows (spec tts.md §5) against the golden tensors.

Layout and validation tests use a tiny fake tokenizer, so they run without ../shared.
"""

import json
import types

import pytest
import torch

from conftest import import_module, shared_path

prompting = import_module("prompting")

VOICE_CLONE_TEXT = "Hello world, this is a parity test."
CONTINUATION_TEXT = "你好，世界。Hello again."


class WordTokenizer:
    """Fake tokenizer: one id per whitespace-separated word (ids 100 + len(word)); nothing special."""

    def encode(self, text, add_special_tokens=False):
        return [100 + len(word) for word in text.split()]


def tiny_config(n_vq: int = 4) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        pad_token_id=3, im_start_token_id=4, im_end_token_id=5, audio_start_token_id=6, audio_end_token_id=7,
        audio_user_slot_token_id=8, audio_assistant_slot_token_id=9, n_vq=n_vq, audio_pad_token_id=1024,
        audio_codebook_sizes=[1024] * n_vq,
    )


@pytest.fixture(scope="module")
def golden_config_dict() -> dict:
    return json.loads(shared_path("golden", "tts_tiny", "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["namespace", "MossTTSNanoConfig"])
def config(request, golden_config_dict):
    """The golden config as a plain namespace (prompting needs only its attributes), and as the config class."""
    if request.param == "namespace":
        return types.SimpleNamespace(**golden_config_dict)
    return import_module("configuration_moss_tts_nano").MossTTSNanoConfig(**golden_config_dict)


@pytest.fixture(scope="module")
def expected() -> dict:
    from safetensors.torch import load_file

    return load_file(str(shared_path("golden", "tts_tiny", "expected.safetensors")))


@pytest.fixture(scope="module")
def golden_tokenizer_cases() -> dict:
    return json.loads(shared_path("golden", "tts_tiny", "cases.json").read_text(encoding="utf-8"))["tokenizer"]


def test_template_helpers_give_golden_ids(tokenizer, config, golden_tokenizer_cases):
    golden = golden_tokenizer_cases["prompting"]
    text = golden["text_for_build_prompt_token_ids"]
    results = {
        "build_user_prompt_prefix": prompting.build_user_prompt_prefix(tokenizer, config),
        "build_user_prompt_after_reference": prompting.build_user_prompt_after_reference(tokenizer),
        "build_assistant_prompt_prefix": prompting.build_assistant_prompt_prefix(tokenizer, config),
        "build_prompt_prefix": prompting.build_prompt_prefix(tokenizer, config),
        "build_prompt_suffix": prompting.build_prompt_suffix(tokenizer, config),
        "build_prompt_token_ids": prompting.build_prompt_token_ids(tokenizer, config, text),
    }
    assert set(results) == set(golden["helpers"])
    for name, ids in results.items():
        assert ids == golden["helpers"][name]["ids"], name
        assert len(ids) == golden["helpers"][name]["length"], name
        assert prompting.decode_text(tokenizer, ids) == golden["helpers"][name]["decoded"], name


def test_decode_text_gives_golden_text(tokenizer, golden_tokenizer_cases):
    for case in golden_tokenizer_cases["cases"]:
        assert prompting.decode_text(tokenizer, case["ids"]) == case["decode_prompting_decode_text"], case["text"]
    assert prompting.decode_text(tokenizer, torch.tensor([7026, 1177, 10380])) == "Hello world."


def test_voice_clone_rows_equal_golden_input_ids(tokenizer, config, expected):
    codes = expected["forward_voice_clone.prompt_audio_codes"]
    ids, mask = prompting.build_voice_clone_rows(tokenizer, config, VOICE_CLONE_TEXT, codes)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(ids, expected["forward_voice_clone.input_ids"])
    assert torch.equal(mask, expected["forward_voice_clone.attention_mask"])


def test_continuation_rows_equal_golden_input_ids(tokenizer, config, expected):
    ids, mask = prompting.build_continuation_rows(tokenizer, config, CONTINUATION_TEXT)
    assert torch.equal(ids, expected["greedy_continuation_text_only.input_ids"])
    assert torch.equal(mask, expected["greedy_continuation_text_only.attention_mask"])


def test_left_pad_batch_equals_golden_batch(tokenizer, config, expected):
    row0 = prompting.build_voice_clone_rows(
        tokenizer, config, VOICE_CLONE_TEXT, expected["batch_left_pad.row0_prompt_audio_codes"]
    )
    row1 = prompting.build_voice_clone_rows(
        tokenizer, config, "Short one.", expected["batch_left_pad.row1_prompt_audio_codes"]
    )
    assert torch.equal(row1[0], expected["batch_left_pad.row1_input_ids_unpadded"])
    ids, mask = prompting.left_pad_batch([row0[0], row1[0]], [row0[1], row1[1]], config, device="cpu")
    assert torch.equal(ids, expected["batch_left_pad.input_ids"])
    assert torch.equal(mask, expected["batch_left_pad.attention_mask"])


def test_voice_clone_layout_puts_reference_rows_between_audio_markers():
    config = tiny_config()
    codes = torch.arange(12).reshape(3, 4)
    ids, mask = prompting.build_voice_clone_rows(WordTokenizer(), config, "one two", codes)
    head = len(prompting.build_user_prompt_prefix(WordTokenizer(), config))
    assert ids.shape == (1, ids.shape[1], 5) and bool(mask.all())
    assert ids[0, head, 0] == 6 and ids[0, head + 4, 0] == 7 and ids[0, -1, 0] == 6
    assert torch.equal(ids[0, head + 1 : head + 4, 0], torch.full((3,), 8))
    assert torch.equal(ids[0, head + 1 : head + 4, 1:], codes)
    text_rows = torch.cat([ids[0, : head + 1], ids[0, head + 4 :]])
    assert bool((text_rows[:, 1:] == 1024).all())


def test_continuation_concatenates_prompt_text_and_appends_assistant_audio_rows():
    config, tokenizer = tiny_config(), WordTokenizer()
    codes = torch.tensor([[1, 2, 3, 1024], [5, 6, 7, 1024]])
    ids, _ = prompting.build_continuation_rows(tokenizer, config, "cd ef", prompt_text="ab ", prompt_audio_codes=codes)
    text_ids = prompting.build_prompt_token_ids(tokenizer, config, "ab cd ef") + [6]
    assert ids.shape == (1, len(text_ids) + 2, 5)
    assert ids[0, : len(text_ids), 0].tolist() == text_ids
    assert ids[0, -2:, 0].tolist() == [9, 9]
    assert torch.equal(ids[0, -2:, 1:], codes)


def test_continuation_requires_prompt_text_and_audio_together():
    config, tokenizer = tiny_config(), WordTokenizer()
    with pytest.raises(ValueError, match="prompt_audio_codes"):
        prompting.build_continuation_rows(tokenizer, config, "text", prompt_text="prompt")
    codes = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="prompt_text"):
        prompting.build_continuation_rows(tokenizer, config, "text", prompt_audio_codes=codes)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.zeros(2, 4), "dtype"),
        (torch.zeros(4, dtype=torch.long), "shape"),
        (torch.zeros(2, 3, dtype=torch.long), "shape"),
        (torch.zeros(0, 4, dtype=torch.long), "shape"),
        (torch.tensor([[0, 1, 2, 1025]]), "1025"),
        (torch.tensor([[0, -1, 2, 3]]), "-1"),
    ],
)
def test_malformed_prompt_codes_raise_value_error(codes, message):
    with pytest.raises(ValueError, match=message):
        prompting.build_voice_clone_rows(WordTokenizer(), tiny_config(), "text", codes)


def test_voice_clone_without_codes_raises_value_error():
    with pytest.raises(ValueError, match="prompt_audio_codes"):
        prompting.build_voice_clone_rows(WordTokenizer(), tiny_config(), "text", None)


def test_codes_are_checked_against_each_channels_codebook_size():
    config = tiny_config()
    config.audio_codebook_sizes = [1024, 1024, 512, 1024]
    with pytest.raises(ValueError, match=r"\[0, 2\] = 600"):
        prompting.validate_prompt_audio_codes(config, [[0, 0, 600, 0]])
    assert prompting.validate_prompt_audio_codes(config, [[0, 0, 511, 1024]]).dtype == torch.long


def test_left_pad_batch_pads_on_the_left_with_pad_rows():
    config = tiny_config(n_vq=2)
    short = torch.tensor([[[10, 1, 2]]])
    long = torch.tensor([[[20, 1024, 1024], [21, 5, 6], [22, 7, 8]]])
    ids, mask = prompting.left_pad_batch([short, long[0]], [torch.ones(1, 1, dtype=torch.bool), torch.ones(3)], config)
    assert ids.shape == (2, 3, 3) and mask.dtype == torch.bool
    assert ids[0].tolist() == [[3, 1024, 1024], [3, 1024, 1024], [10, 1, 2]]
    assert torch.equal(ids[1], long[0])
    assert mask.tolist() == [[False, False, True], [True, True, True]]


def test_left_pad_batch_rejects_mismatched_inputs():
    config = tiny_config(n_vq=2)
    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks"):
        prompting.left_pad_batch([ids, ids], [mask], config)
    with pytest.raises(ValueError, match="ids_list\\[0\\]"):
        prompting.left_pad_batch([torch.zeros(1, 2, 5, dtype=torch.long)], [mask], config)
    with pytest.raises(ValueError, match="mask_list\\[0\\]"):
        prompting.left_pad_batch([ids], [torch.ones(1, 3, dtype=torch.bool)], config)
    with pytest.raises(ValueError, match="expected the same number"):
        prompting.left_pad_batch([], [], config)


def test_non_string_text_raises_value_error():
    with pytest.raises(ValueError, match="text"):
        prompting.build_continuation_rows(WordTokenizer(), tiny_config(), None)
