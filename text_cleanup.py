"""Clean up what language models write before it is spoken: markdown, code, links, emoji, stray symbols.

A chat model's answer is markdown: `**bold**`, `# headings`, `- list items`, `[links](https://...)`, code, tables,
emoji, "!!!" and newlines that end a thought without a full stop. Read as written, the TTS model speaks asterisks or
runs list items together. `clean_text` keeps the words and the punctuation that shapes prosody and drops the rest:

* fenced code blocks are dropped (code is not prose); inline `code` keeps its text;
* links and images keep their text ([text](url) -> text); bare URLs are dropped;
* headings, list markers, block quotes and table rules lose their markers; table cells are joined by commas;
* emphasis markers (*, _, ~~) and HTML tags are dropped; emoji and pictographs are dropped;
* runs of the same punctuation collapse ("!!!" -> "!", "?!" -> "?", "...." -> "...");
* each line that ends without sentence punctuation gets a full stop ("." or "。" after CJK), so lines become sentences.

Symbols that carry meaning for verbalization ($ € % ° : / + - & @ #digits) are kept for the verbalize stage
(text_wetext.py, text_numbers.py).
"""

from __future__ import annotations

import re

# Sentence ends that a line may already have (Latin and CJK), so no full stop is added after them.
LINE_END_MARKS = ".!?。！？;；:：…"
_CJK_CHAR = re.compile("[\u3001-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff01-\uff60]")

_FENCED_CODE = re.compile(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`+([^`\n]*)`+")
_IMAGE_OR_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)")
_URL = re.compile(r"<?\b(?:https?://|www\.)[^\s<>]+>?")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>\n]*>")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$", re.M)
_LINE_MARKER = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|>+[ \t]?|[-*+•][ \t]+|\d{1,3}[.)][ \t]+)", re.M)
_RULE_LINE = re.compile(r"^\s*([-*_=])(\s*\1){2,}\s*$", re.M)
_EMPHASIS = (
    re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"),
    re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?!\w)"),
    re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])"),
    re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"),
)
# Emoji, pictographs, dingbats, regional indicators, variation selectors and the zero-width joiner.
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\u2B00-\u2BFF"
                    "\uFE0E\uFE0F\u200D\u20E3\u2190-\u21FF\u2300-\u23FF\u25A0-\u25FF]")
# Symbols read aloud as noise; the ones verbalization needs are not listed.
_STRAY_SYMBOLS = re.compile(r"[*_~^|\\<>{}\[\]`=]+|#(?!\d)")
# Spaces before punctuation go first, so that "! !" also collapses.
_REPEATED = ((re.compile(r"\s+([,.!?;:])(?=\s|$|[,.!?;:])"), r"\1"), (re.compile(r"\.{4,}"), "..."),
             (re.compile(r"[!?]*\?[!?]+|[!?]+\?"), "?"), (re.compile(r"!{2,}"), "!"),
             (re.compile(r"([,;:，；：。！？、])\1+"), r"\1"))
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def clean_text(text: str) -> str:
    """`text` with the markup of language-model output removed (module docstring); words and order kept.

    Returns:
        One line of text; an empty string when nothing speakable is left.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _FENCED_CODE.sub("\n", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _IMAGE_OR_LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _TABLE_RULE.sub("", text)
    text = _RULE_LINE.sub("", text)
    text = _LINE_MARKER.sub("", text)
    text = _table_cells_to_commas(text)
    for pattern in _EMPHASIS:
        text = pattern.sub(r"\2" if pattern.groups == 2 else r"\1", text)
    text = _EMOJI.sub("", text)
    text = _STRAY_SYMBOLS.sub(" ", text)
    return _join_lines(text)


def _table_cells_to_commas(text: str) -> str:
    """'| a | b |' -> 'a, b' (table rows become lists)."""
    lines = []
    for line in text.split("\n"):
        if line.count("|") >= 2:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            line = ", ".join(cell for cell in cells if cell)
        lines.append(line)
    return "\n".join(lines)


def _join_lines(text: str) -> str:
    """Lines joined into one, each ending in sentence punctuation; repeated punctuation and spaces collapsed."""
    sentences = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip(" ,;")
        if not any(character.isalnum() for character in line):
            continue
        if not line.endswith(tuple(LINE_END_MARKS)) and not line.endswith(("\"", "'", ")", "”", "’", "」")):
            line += "。" if _CJK_CHAR.search(line[-1]) else "."
        sentences.append(line)
    joined = "".join(sentence if index == 0 or _CJK_CHAR.search(sentences[index - 1][-1]) else " " + sentence
                     for index, sentence in enumerate(sentences))
    for pattern, replacement in _REPEATED:
        joined = pattern.sub(replacement, joined)
    return _SPACES.sub(" ", joined).strip()


__all__ = ["LINE_END_MARKS", "clean_text"]
