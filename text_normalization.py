"""The text pipeline in front of chunking: what is written -> what is spoken.

    clean_text (text_cleanup.py)        markdown, code, links, emoji, stray symbols, repeated punctuation, newlines
    language (text_language.py)         the request's `language`, else detected from the cleaned text
    verbalize                           numbers, dates, times, currencies, units, percentages as words in that
                                        language: WeTextProcessing for zh / en (text_wetext.py), our rules over
                                        num2words for the other languages (text_numbers.py); Greek keeps its digits

`infer_npu.py` and the server run it by default (`--no-normalize`, request field `normalize: false` turn it off);
`model.inference` / `inference_stream` run it only when asked (`normalize=True`), so their default output stays
upstream's. Upstream's two switches map onto the two stages: `cleanup` (--enable-normalize-tts-text) and `verbalize`
(--enable-wetext-processing).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

from .text_cleanup import clean_text
from .text_language import check_language, detect_language
from .text_numbers import SUPPORTED_LANGUAGES, NumberSpeller
from .text_wetext import verbalize_chinese, verbalize_english

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextOptions:
    """Which stages run (upstream's --enable-normalize-tts-text and --enable-wetext-processing) and the language
    (None: detected)."""

    cleanup: bool = True
    verbalize: bool = True
    language: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.cleanup or self.verbalize


@dataclass(frozen=True)
class NormalizedText:
    """The text to speak, the language it was verbalized in, and the text as written."""

    text: str
    language: str
    written: str


def normalize_text(text: str, language: Optional[str] = None, *, cleanup: bool = True,
                   verbalize: bool = True) -> NormalizedText:
    """What `text` sounds like when read aloud (module docstring).

    Args:
        text: the text as written (markdown allowed).
        language: a model language ("de", "pt-BR", ...); None detects it from the text.
        cleanup: run clean_text (upstream's --enable-normalize-tts-text).
        verbalize: spell numbers etc. in the language (upstream's --enable-wetext-processing).

    Returns:
        NormalizedText; with both stages off its text is `text` unchanged.

    Raises:
        ValueError: `text` empty or with nothing speakable left after cleanup; `language` not a model language.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; expected a non-empty string to synthesise")
    chosen = check_language(language) if language is not None else None
    spoken = clean_text(text) if cleanup else text
    if not spoken.strip():
        raise ValueError(f"text={_preview(text)!r} has nothing to speak once markup, code, links and emoji are "
                         "removed; expected words (or turn text normalization off)")
    chosen = chosen or detect_language(spoken)
    if verbalize:
        spoken = verbalize_text(spoken, chosen)
    return NormalizedText(spoken, chosen, text)


def verbalize_text(text: str, language: str) -> str:
    """Numbers, dates, times, currencies, units and percentages of `text` as words in `language`."""
    if language == "en":
        return verbalize_english(text)
    if language == "zh":
        return verbalize_chinese(text)
    if language in SUPPORTED_LANGUAGES:
        return _speller(language).spell(text)
    logger.debug("no number rules for language %r; its digits are kept", language)
    return text


@functools.lru_cache(maxsize=None)
def _speller(language: str) -> NumberSpeller:
    return NumberSpeller(language)


def _preview(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["NormalizedText", "TextOptions", "normalize_text", "verbalize_text"]
