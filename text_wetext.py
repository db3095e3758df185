"""Chinese and English verbalization with WeTextProcessing (`tn`), loaded lazily and once, plus our fixes.

WeTextProcessing 1.2.0 ships its compiled grammars (en_tn_*.fst, zh_tn_*.fst) in the wheel, so building a normalizer
reads files and never downloads; loading one takes about 0.3 s on a quiet machine (2 s on a busy one), so each is
built on first use and kept (thread-safe). Its slips that we fix, each with a test:

* English "$20.50" -> "twenty point five dollars": a currency amount is rewritten first to the words WeTextProcessing
  reads correctly ("20 dollars and 50 cents");
* English "1,234" -> "thousand two hundred and thirty four" (the "one" is lost): grouped integers are spelled by
  num2words first;
* English "Dec. 7" -> "Dec. seven": the sentence split ends a sentence at "Dec." and the grammar reads the day
  alone; an abbreviated month before a number loses its period ("Dec 7" -> "the seventh of december");
* English "December 7, 2026" -> "the seventh of december , twenty twenty six": the space before the comma goes;
* Chinese "¥20.5" / "￥20.5" -> "二十点五" without 元: the symbol becomes a trailing 元;
* Chinese full-width punctuation comes back half-width ("，" -> ","): restored after CJK characters, so the text
  keeps the punctuation the chunker and the model saw in training.

Chinese options: interjections, erhua and traditional characters are kept (we verbalize, we do not rewrite).
"""

from __future__ import annotations

import logging
import re
import threading

from num2words import num2words

# WeTextProcessing adds its own stderr handler at INFO to its logger unless that logger has a handler already: a
# NullHandler keeps its records going to the application's logging, and only its warnings.
_WETEXT_LOGGER = logging.getLogger("wetext")
if not _WETEXT_LOGGER.handlers:
    _WETEXT_LOGGER.addHandler(logging.NullHandler())
    _WETEXT_LOGGER.setLevel(logging.WARNING)

_LOCK = threading.Lock()
_NORMALIZERS: dict = {}

_EN_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
                  "€": ("euro", "euros", "cent", "cents")}
_EN_MONEY = re.compile(r"(?P<symbol>[$£€])\s?(?P<integer>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<cents>\d{1,2}))?(?!\d)"
                       r"(?P<scale>\s?(?:thousand|million|billion|[kKmMbB]n?)\b)?")
_EN_SPACE_BEFORE_PUNCTUATION = re.compile(r"(?<=\w) +([,;:!?])")
_EN_MONTH_PERIOD = re.compile(r"\b(Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\.(?=\s+\d)")
_EN_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,]\d)")
_ZH_MONEY = re.compile(r"[¥￥]\s?(\d+(?:\.\d+)?)")
_ZH_HALF_PUNCTUATION = re.compile(r"(?<=[\u3400-\u4dbf\u4e00-\u9fff\u3002\uff0c])\s?([,.!?;:])")
_FULL_WIDTH = {",": "，", ".": "。", "!": "！", "?": "？", ";": "；", ":": "："}
# Where a text is cut into sentences, how they are joined again, and what a sentence needs to be worth normalizing.
_SENTENCE_END = {"en": re.compile(r"(?<=[.!?;])\s+"), "zh": re.compile(r"(?<=[。！？；])")}
_SENTENCE_JOINER = {"en": " ", "zh": ""}
_NEEDS_GRAMMAR = {"en": re.compile(r"[0-9$€£¥%&@°#/+=~]|\b[A-Z][a-z]{0,3}\.|\b[A-Z]{2,}\b"),
                  "zh": re.compile(r"[0-9０-９$€£¥￥%％°℃&@#/+=~:：A-Za-z]")}


def normalizer(language: str):
    """The WeTextProcessing normalizer of "en" or "zh", built on first use (thread-safe), then reused."""
    with _LOCK:
        if language not in _NORMALIZERS:
            _NORMALIZERS[language] = _build(language)
        return _NORMALIZERS[language]


def _build(language: str):
    # Imported in try blocks: transformers' remote-code check then does not ask for a package named `tn` (its
    # distribution is WeTextProcessing), and a model loaded without it still runs with normalize off.
    try:
        if language == "en":
            from tn.english.normalizer import Normalizer

            return Normalizer(overwrite_cache=False)
        if language == "zh":
            from tn.chinese.normalizer import Normalizer

            return Normalizer(overwrite_cache=False, remove_interjections=False, remove_erhua=False,
                              traditional_to_simple=False, full_to_half=False)
    except ImportError as error:
        raise ImportError(f"text normalization of {language!r} needs WeTextProcessing: pip install -r requirements.txt "
                          f"(or pip install WeTextProcessing==1.2.0), or turn normalization off ({error})") from None
    raise ValueError(f"language={language!r}; WeTextProcessing here covers 'en' and 'zh'")


def by_sentence(language: str, text: str) -> str:
    """`text` through the grammar of `language` sentence by sentence, skipping sentences the grammar cannot change.

    The grammars cost about 1 ms per character (2 cores, busy), so a long plain-prose text would wait seconds for
    nothing: a sentence goes through only if it has a digit, a symbol, an abbreviation or an acronym
    (_NEEDS_GRAMMAR). Sentences are independent for these rules, so the result is the whole text's.
    """
    grammar, pieces = normalizer(language), _SENTENCE_END[language].split(text)
    spoken = [grammar.normalize(piece) if _NEEDS_GRAMMAR[language].search(piece) else piece for piece in pieces]
    return _SENTENCE_JOINER[language].join(piece for piece in spoken if piece)


def verbalize_english(text: str) -> str:
    """English `text` with numbers, dates, times, currencies, units and percentages as words."""
    text = _EN_MONEY.sub(_english_money, text)
    text = _EN_MONTH_PERIOD.sub(r"\1", text)
    text = _EN_GROUPED.sub(lambda match: num2words(int(match.group(0).replace(",", "")), lang="en"), text)
    return _EN_SPACE_BEFORE_PUNCTUATION.sub(r"\1", by_sentence("en", text))


def _english_money(match: re.Match) -> str:
    """'$20.50' -> '20 dollars and 50 cents'; '$1.5M' and '$3 million' keep the scale before the currency."""
    singular, plural, cent, cents = _EN_CURRENCIES[match.group("symbol")]
    integer = match.group("integer").replace(",", "")
    scale = (match.group("scale") or "").strip()
    if scale:
        scale = {"k": "thousand", "m": "million", "mn": "million", "b": "billion", "bn": "billion"}.get(
            scale.lower(), scale)
        amount = integer + ("." + match.group("cents") if match.group("cents") else "")
        return f"{amount} {scale} {plural}"
    words = f"{integer} {singular if integer == '1' else plural}"
    if match.group("cents") and int(match.group("cents").ljust(2, "0")):
        value = int(match.group("cents").ljust(2, "0"))
        words += f" and {value} {cent if value == 1 else cents}"
    return words


def verbalize_chinese(text: str) -> str:
    """Chinese `text` with numbers, dates, times, currencies, units and percentages as words."""
    text = _ZH_MONEY.sub(r"\1元", text)
    return full_width_punctuation(by_sentence("zh", text))


def full_width_punctuation(text: str) -> str:
    """Half-width , . ! ? ; : after a CJK character (as WeTextProcessing writes them) back to full width."""
    return _ZH_HALF_PUNCTUATION.sub(lambda match: _FULL_WIDTH[match.group(1)], text)


__all__ = ["by_sentence", "full_width_punctuation", "normalizer", "verbalize_chinese", "verbalize_english"]
