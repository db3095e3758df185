"""Voice-clone text chunking and the pauses between chunks (spec tts.md §7.2).

Upstream `_prepare_text_for_sentence_chunking` and `_split_text_into_best_sentences` decide which text each
voice-clone chunk gets, so their quirks change the prompt rows and are reproduced on purpose (spec §11 item 10):

* `prepare_text_for_chunking` prefixes texts of fewer than 5 words with 8 spaces, but every piece is stripped when
  split, so the prefix never reaches a chunk;
* the capitalisation and the appended "." / "。" reach the chunks (the caller keeps them only for >= 2 chunks, see
  `voice_clone_text_chunks`).

Token counts are `len(tokenizer.encode(text, add_special_tokens=False))` throughout.

Long texts: the longest-fitting-prefix binary search re-tokenises prefixes of the remaining clause, which costs
O(len(clause)) per cut and O(n^2) for an unpunctuated text. `_longest_fitting_prefix` first finds a short prefix
that is clearly over the budget and answers the search's probes beyond it without tokenising, so the search visits
the same probes and returns the same cut while tokenising only short prefixes.
"""

import re

SENTENCE_END_CHARS = ".!?。！？；;"
CLOSING_CHARS = "\"'”’)]}）】》」』"
CLAUSE_END_CHARS = ",，、；;：:"
# A cut inside an over-long clause moves back to just after one of these, if one is among its last 24 characters.
CUT_BOUNDARY_CHARS = set(CLAUSE_END_CHARS + SENTENCE_END_CHARS + " ")
CUT_LOOKBACK_CHARS = 24
# Texts with fewer words get the (dead, see module docstring) 8-space prefix.
SHORT_TEXT_WORDS = 5
SHORT_TEXT_PREFIX = " " * 8
# Pause after a chunk: longer after very short chunks (upstream values).
SHORT_CHUNK_WORDS = 4
SHORT_CHUNK_PAUSE_SECONDS = 0.40
PAUSE_SECONDS = 0.24

_CJK_RE = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\u3040-\u30ff\uac00-\ud7af]")
_SPACE_RUN_RE = re.compile(" {2,}")
# One sentence end: the punctuation mark, any closing marks right after it, then the whitespace that follows.
_SENTENCE_END_RE = re.compile(f"[{re.escape(SENTENCE_END_CHARS)}][{re.escape(CLOSING_CHARS)}]*\\s*")
_CLAUSE_END_RE = re.compile(f"[{re.escape(CLAUSE_END_CHARS)}]")
# Clauses shorter than this many characters are searched without the probe shortcut (covers every normal text).
_EXACT_SEARCH_MAX_CHARS = 2048


def contains_cjk(text: str) -> bool:
    """True if `text` has a Han, kana or Hangul character (the upstream CJK test)."""
    return _CJK_RE.search(text) is not None


def count_tokens(tokenizer, text: str) -> int:
    """Number of text tokens of `text`, as upstream counts them (no special tokens added)."""
    return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))


def prepare_text_for_chunking(text: str) -> str:
    """Normalise `text` before splitting (spec §7.2 step 1, upstream `_prepare_text_for_sentence_chunking`).

    Args:
        text: The text to synthesise.

    Returns:
        The stripped text with newlines turned into spaces and space runs collapsed. CJK text gets a final "。"
        unless it already ends with sentence punctuation; other text gets an upper-case first character, a final
        "." after an alphanumeric last character, and an 8-space prefix when it has fewer than 5 words.

    Raises:
        ValueError: if `text` is not a string or is empty after stripping.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; expected a non-empty string to synthesise")
    prepared = _SPACE_RUN_RE.sub(" ", text.strip().replace("\n", " "))
    if contains_cjk(prepared):
        if not prepared.endswith(tuple(SENTENCE_END_CHARS)):
            prepared += "。"
        return prepared
    prepared = prepared[0].upper() + prepared[1:]
    if prepared[-1].isalnum():
        prepared += "."
    if len(prepared.split()) < SHORT_TEXT_WORDS:
        prepared = SHORT_TEXT_PREFIX + prepared
    return prepared


def split_sentences(text: str) -> list[str]:
    """Split after each sentence-ending mark plus its closing marks; pieces are stripped, empty ones dropped."""
    pieces, start = [], 0
    for match in _SENTENCE_END_RE.finditer(text):
        pieces.append(text[start : match.end()].strip())
        start = match.end()
    pieces.append(text[start:].strip())
    return [piece for piece in pieces if piece]


def split_clauses(sentence: str) -> list[str]:
    """Split after each clause mark (`,，、；;：:`); pieces are stripped, empty ones dropped."""
    pieces, start = [], 0
    for match in _CLAUSE_END_RE.finditer(sentence):
        pieces.append(sentence[start : match.end()].strip())
        start = match.end()
    pieces.append(sentence[start:].strip())
    return [piece for piece in pieces if piece]


def _first_clearly_over_budget(tokenizer, text: str, max_tokens: int) -> int:
    """Length of a prefix whose count exceeds the budget by a safe margin (len(text) if none is found).

    Token counts grow with the prefix except for a wobble of a few tokens at the cut word; beyond a prefix that is
    `margin` tokens over the budget no longer prefix can fit, so the binary search may treat those probes as misses.
    """
    margin = max(8, max_tokens // 4)
    length = 64
    while length < len(text):
        if count_tokens(tokenizer, text[:length]) > max_tokens + margin:
            return length
        length *= 2
    return len(text)


def _longest_fitting_prefix(
    tokenizer, text: str, max_tokens: int, exact_max_chars: int = _EXACT_SEARCH_MAX_CHARS
) -> int:
    """Binary search for the longest prefix of `text` whose count fits `max_tokens` (at least 1 character).

    Args:
        tokenizer: HF tokenizer used for the counts.
        text: The clause to cut (its full count is over the budget).
        max_tokens: The budget.
        exact_max_chars: Clauses longer than this use the probe shortcut (see `_first_clearly_over_budget`).

    Returns:
        The prefix length in characters.
    """
    over = len(text) if len(text) <= exact_max_chars else _first_clearly_over_budget(tokenizer, text, max_tokens)
    low, high, best = 1, len(text), 0
    while low <= high:
        middle = (low + high) // 2
        fits = middle < over and count_tokens(tokenizer, text[:middle]) <= max_tokens
        if fits:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return max(best, 1)


def _cut_position(text: str, prefix_length: int) -> int:
    """Move a cut back to just after the last boundary character among the prefix's last 24 characters."""
    for index in range(prefix_length - 1, max(prefix_length - CUT_LOOKBACK_CHARS, 0) - 1, -1):
        if text[index] in CUT_BOUNDARY_CHARS:
            return index + 1
    return prefix_length


def _fits(tokenizer, text: str, max_tokens: int, exact_max_chars: int = _EXACT_SEARCH_MAX_CHARS) -> bool:
    """count(text) <= max_tokens, without tokenising all of a long text that is clearly over the budget."""
    if len(text) > exact_max_chars and _first_clearly_over_budget(tokenizer, text, max_tokens) < len(text):
        return False
    return count_tokens(tokenizer, text) <= max_tokens


def split_by_budget(
    tokenizer, clause: str, max_tokens: int, exact_max_chars: int = _EXACT_SEARCH_MAX_CHARS
) -> list[str]:
    """Cut an over-budget clause into stripped pieces that each fit (spec §7.2 step 3, second half).

    `exact_max_chars` only selects where the long-text shortcut applies (tests lower it to check equivalence).
    """
    pieces, rest = [], clause
    while rest:
        if _fits(tokenizer, rest, max_tokens, exact_max_chars):
            pieces.append(rest)
            break
        prefix_length = _longest_fitting_prefix(tokenizer, rest, max_tokens, exact_max_chars)
        cut = _cut_position(rest, prefix_length)
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [piece for piece in pieces if piece]


def _budget_pieces(tokenizer, text: str, max_tokens: int) -> list[tuple[str, int]]:
    """Sentences, with over-budget ones split into clauses and then cut by the budget, with their counts."""
    pieces = []
    for sentence in split_sentences(text):
        count = count_tokens(tokenizer, sentence)
        if count <= max_tokens:
            pieces.append((sentence, count))
            continue
        for clause in split_clauses(sentence):
            for piece in split_by_budget(tokenizer, clause, max_tokens):
                pieces.append((piece, count_tokens(tokenizer, piece)))
    return pieces


def _join(left: str, right: str) -> str:
    """Join two pieces: no separator if either side has CJK, else one space."""
    return left + ("" if contains_cjk(left) or contains_cjk(right) else " ") + right


def _merge_pieces(tokenizer, pieces: list[tuple[str, int]], max_tokens: int) -> list[str]:
    """Greedy merge while the current count plus the next piece's count fits; the count is re-taken after a join."""
    chunks, current, current_count = [], None, 0
    for piece, count in pieces:
        if current is not None and current_count + count <= max_tokens:
            current = _join(current, piece)
            current_count = count_tokens(tokenizer, current)
            continue
        if current is not None:
            chunks.append(current)
        current, current_count = piece, count
    if current is not None:
        chunks.append(current)
    return chunks


def split_text_into_chunks(tokenizer, text: str, max_tokens: int) -> list[str]:
    """Split `text` into chunks of at most `max_tokens` tokens (upstream `_split_text_into_best_sentences`).

    Spec §7.2 steps 1-4: prepare, split into sentences, split over-budget sentences into clauses and over-budget
    clauses at the longest fitting prefix, then merge greedily. A text that yields one chunk gives the prepared,
    stripped text (e.g. "hello there" -> ["Hello there."]); the caller's single-chunk rule (step 5) is
    `voice_clone_text_chunks`.

    Args:
        tokenizer: HF tokenizer (`encode(text, add_special_tokens=False)`) used for every count.
        text: The text to synthesise.
        max_tokens: Token budget per chunk, >= 1.

    Returns:
        The chunks, in order; a chunk is over the budget only if one character alone is.

    Raises:
        ValueError: if `text` is empty or `max_tokens` is not a positive integer.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 1")
    prepared = prepare_text_for_chunking(text)
    return _merge_pieces(tokenizer, _budget_pieces(tokenizer, prepared, max_tokens), max_tokens)


def voice_clone_text_chunks(tokenizer, text: str, max_tokens: int) -> list[str]:
    """The text chunks voice-clone inference synthesises (spec §7.2, including step 5).

    Args:
        tokenizer: HF tokenizer used for the counts.
        text: The text to synthesise.
        max_tokens: Token budget per chunk; <= 0 disables chunking.

    Returns:
        `[text]` (the original, unprepared text) when chunking is disabled or yields a single chunk, else the
        chunks of `split_text_into_chunks`.

    Raises:
        ValueError: if `text` is empty or `max_tokens` is not an integer.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"max_tokens={max_tokens!r} is invalid; expected an integer (<= 0 disables chunking)")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; expected a non-empty string to synthesise")
    if max_tokens <= 0:
        return [text]
    chunks = split_text_into_chunks(tokenizer, text, max_tokens)
    return chunks if len(chunks) > 1 else [text]


def pause_seconds_after(chunk: str) -> float:
    """Silence after a chunk that is not the last: 0.40 s if it has <= 4 whitespace-separated words, else 0.24 s."""
    return SHORT_CHUNK_PAUSE_SECONDS if len(chunk.split()) <= SHORT_CHUNK_WORDS else PAUSE_SECONDS


def pause_samples(chunk: str, sample_rate: int) -> int:
    """Length in samples of the pause after `chunk`: round(sample_rate * pause_seconds_after(chunk)).

    Raises:
        ValueError: if `sample_rate` is not a positive integer.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate!r} is invalid; expected a positive integer (Hz)")
    return int(round(sample_rate * pause_seconds_after(chunk)))


__all__ = [
    "contains_cjk",
    "count_tokens",
    "pause_samples",
    "pause_seconds_after",
    "prepare_text_for_chunking",
    "split_text_into_chunks",
    "voice_clone_text_chunks",
]
