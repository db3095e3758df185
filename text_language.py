"""Which language a text is in: a request's `language` checked, or a guess from the text (script, then words).

The model speaks the LANGUAGES below; text normalization (text_normalization.py) verbalizes numbers with that
language's rules, so a wrong guess reads German digits as English words. The guess is deliberately simple and
offline: the writing system decides first (Hangul -> ko, kana -> ja, other Han -> zh, Hebrew, Arabic vs Persian
letters, Cyrillic -> ru, Greek); Latin-script text is scored by a few frequent function words and the letters only
one language uses, and falls back to English when nothing scores.
"""

from __future__ import annotations

import re
import unicodedata

# The model's languages (ISO 639-1).
LANGUAGES = ("zh", "en", "de", "es", "fr", "ja", "it", "he", "ko", "ru", "fa", "ar", "pl", "pt", "cs", "da", "sv",
             "hu", "el", "tr")
DEFAULT_LANGUAGE = "en"

# Scripts, in the order they decide: the first that occurs in the text wins (kana before Han: Japanese mixes both).
_SCRIPTS = (
    ("ko", re.compile("[\uac00-\ud7af\u1100-\u11ff]")),
    ("ja", re.compile("[\u3040-\u30ff]")),
    ("zh", re.compile("[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("he", re.compile("[\u0590-\u05ff]")),
    ("arabic", re.compile("[\u0600-\u06ff]")),
    ("ru", re.compile("[\u0400-\u04ff]")),
    ("el", re.compile("[\u0370-\u03ff]")),
)
# Letters that Persian writes and Arabic does not (pe, che, zhe, gaf, keheh, farsi yeh).
_PERSIAN_LETTERS = re.compile("[\u067e\u0686\u0698\u06af\u06a9\u06cc]")

# Frequent short words of each Latin-script language (a hit scores 1) ...
_FUNCTION_WORDS = {
    "en": "the and is are of to in that it with for was this you have not on be at a an we my your me he she they "
          "what how will can do does did from by or but if so all there their our please thank hello yes no",
    "de": "der die das und ist nicht ich sie es mit den ein eine zu von auf für dem wir auch",
    "es": "el la los las y es que de en un una por con para no del se al como",
    "fr": "le la les et est que de des un une pour dans pas sur avec il elle nous vous du au",
    "it": "il lo la gli le e che di un una per con non sono del della è anche come",
    "pt": "o a os as e que de do da um uma para com não em no na por são",
    "pl": "i w na nie że to się jest z do jak ale co tak od",
    "cs": "a v na je se že to s z do jak ale co tak od jsem",
    "da": "og i er det at en til på med den ikke for af jeg som",
    "sv": "och i är det att en till på med den inte för av jag som",
    "hu": "a az és hogy nem is egy van meg de ez azt volt",
    "tr": "ve bir bu da de için ile çok ama ne gibi olarak var",
}
# ... and letters that point to one language (a hit scores 2).
_LETTERS = {"de": "ßäöü", "es": "ñ¿¡", "fr": "çêëîœ", "it": "ìò", "pt": "ãõ", "pl": "łąęśźżń", "cs": "řěůčš",
            "da": "æø", "sv": "å", "hu": "őű", "tr": "ğşı"}
_WORD_RE = re.compile(r"[^\W\d_]+")


def check_language(language) -> str:
    """The model language meant by `language` ("de", "DE", "de-AT", "pt_BR" -> its base code).

    Raises:
        ValueError: not a string, or not one of LANGUAGES.
    """
    if not isinstance(language, str) or not language.strip():
        raise ValueError(f"language={language!r}; expected one of {', '.join(LANGUAGES)}")
    base = re.split("[-_]", language.strip().lower(), maxsplit=1)[0]
    if base not in LANGUAGES:
        raise ValueError(f"language={language!r} is not a language of the model; expected one of "
                         f"{', '.join(LANGUAGES)}")
    return base


def detect_language(text: str) -> str:
    """The most likely model language of `text` (DEFAULT_LANGUAGE when nothing points anywhere)."""
    for language, pattern in _SCRIPTS:
        if pattern.search(text):
            if language == "arabic":
                return "fa" if _PERSIAN_LETTERS.search(text) else "ar"
            return language
    return _latin_language(text)


def _latin_language(text: str) -> str:
    """Score function words (1 each) and language-specific letters (2 each); ties keep the earlier language
    (English first, as the default)."""
    lowered = unicodedata.normalize("NFC", text.lower())
    words = _WORD_RE.findall(lowered)
    scores = {}
    for language, listed in _FUNCTION_WORDS.items():
        vocabulary = set(listed.split())
        scores[language] = sum(word in vocabulary for word in words)
    for language, letters in _LETTERS.items():
        scores[language] += 2 * sum(lowered.count(letter) for letter in letters)
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else DEFAULT_LANGUAGE


__all__ = ["DEFAULT_LANGUAGE", "LANGUAGES", "check_language", "detect_language"]
