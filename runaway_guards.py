"""Runaway guards: end a chunk that runs far past what its text can take, loops, or has gone silent.

The model decides itself when a chunk ends; when it does not (upstream issues #60, #44, #96, #36: runaway or
repeated audio, long pauses), a chunk runs to max_new_frames (375 frames, 30 s, in infer_npu.py). Three checks, all
pure functions of the chunk's text and its codes so far, end it earlier:

* a frame cap from the text: CAP_MARGIN_SECONDS + syllables / SLOWEST_SYLLABLES_PER_SECOND. Read speech runs at 4 to
  6 syllables per second and deliberately slow speech at about 3 (Mandarin about 4 to 5 characters per second), so
  2 syllables per second plus 3 s for breaths and the start is far slower than any speaker; a chunk that is longer
  than that is not reading its text any more. A syllable is a CJK character, a kana or Hangul syllable, or a vowel
  group of a word (at least one per word); a digit counts as two (unnormalized numbers are long to say).
* a loop: the last LOOP_MIN_FRAMES or more frames (2 s) repeat one pattern of 3 to LOOP_MAX_PERIOD frames (of more
  than SILENCE_MAX_DISTINCT codes) at least LOOP_MIN_REPEATS times, on codebook 0 (the coarse one; the fine codebooks
  vary even in a loop), LOOP_MATCH of its codes equal to the code one period earlier.
* silence: for SILENCE_FRAMES frames (3 s) codebook 0 has taken at most SILENCE_MAX_DISTINCT values. The codec
  codes silence (and a stuck decoder) as one or two repeated codes; speech varies them every frame. The thresholds
  come from synthetic sequences (tests/test_runaway_guards.py) and are deliberately loose: calibrate them on
  recordings of the released model before tightening.

`RunawayGuard` applies them to the rows of one generation group; generation.py asks it after every frame (only when
a caller sets one: `model.generate` and `inference` run without guards unless asked, so upstream's outputs hold).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

FRAMES_PER_SECOND = 12.5
SLOWEST_SYLLABLES_PER_SECOND = 2.0
CAP_MARGIN_SECONDS = 3.0
DIGIT_SYLLABLES = 2
LOOP_MIN_FRAMES = 25
LOOP_MAX_PERIOD = 38
LOOP_MIN_REPEATS = 3
LOOP_MATCH = 0.9
SILENCE_FRAMES = 38
SILENCE_MAX_DISTINCT = 2
# Reasons, as reported in results, logs and metrics.
FRAME_CAP, LOOP, SILENCE = "frame_cap", "loop", "silence"

_SYLLABIC_CHAR = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"[^\W\d_]+")
_VOWEL_GROUP = re.compile(r"[aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýœąęіыэюяеёаоуиαεηιουωάέήίόύώ]+", re.I)


def syllable_count(text: str) -> int:
    """About how many syllables `text` takes to say (module docstring)."""
    count = len(_SYLLABIC_CHAR.findall(text)) + DIGIT_SYLLABLES * sum(char.isdigit() for char in text)
    for word in _WORD.findall(_SYLLABIC_CHAR.sub(" ", text)):
        count += max(1, len(_VOWEL_GROUP.findall(word)))
    return count


def frame_cap(text: str, max_new_frames: int) -> int:
    """The most frames a chunk of `text` may take: the text's slowest duration, at most max_new_frames."""
    seconds = CAP_MARGIN_SECONDS + syllable_count(text) / SLOWEST_SYLLABLES_PER_SECOND
    return min(max_new_frames, math.ceil(seconds * FRAMES_PER_SECOND))


def loop_period(codes: Sequence[int]) -> Optional[int]:
    """The period (frames) of a loop that `codes` ends in, or None (module docstring)."""
    for period in range(SILENCE_MAX_DISTINCT + 1, LOOP_MAX_PERIOD + 1):
        span = max(period * LOOP_MIN_REPEATS, math.ceil(LOOP_MIN_FRAMES / period) * period)
        if span > len(codes):
            break
        tail = codes[len(codes) - span:]
        if len(set(tail[-period:])) <= SILENCE_MAX_DISTINCT:
            continue  # a pattern of one or two codes is silence (is_silent), not a spoken loop
        matches = sum(tail[index] == tail[index - period] for index in range(period, span))
        if matches >= LOOP_MATCH * (span - period):
            return period
    return None


def is_silent(codes: Sequence[int]) -> bool:
    """Whether `codes` ends in SILENCE_FRAMES frames of at most SILENCE_MAX_DISTINCT codebook-0 values."""
    return len(codes) >= SILENCE_FRAMES and len(set(codes[-SILENCE_FRAMES:])) <= SILENCE_MAX_DISTINCT


@dataclass
class GuardStop:
    """Why and where a row was ended early."""

    row: int
    reason: str
    frames: int


@dataclass
class RunawayGuard:
    """The checks of one generation group's rows (one text each); `observe` is called once per frame.

    Args:
        caps: per row, its frame cap (frame_cap of its text), or None for none.
    """

    caps: list
    history: list = field(default_factory=list)
    stops: dict = field(default_factory=dict)

    @classmethod
    def for_texts(cls, texts: Sequence[str], max_new_frames: int) -> "RunawayGuard":
        """Caps from the texts; a cap that max_new_frames already enforces is left out (None): a chunk that runs
        that long is reported as cut at max_new_frames, not as stopped by a guard."""
        caps = [frame_cap(text, max_new_frames) for text in texts]
        return cls([cap if cap < max_new_frames else None for cap in caps])

    def fresh(self) -> "RunawayGuard":
        """This guard with its history and stops cleared (a batch is generated again, e.g. by the float32 retry)."""
        self.history, self.stops = [], {}
        return self

    def observe(self, channel0: Sequence[int], active: Sequence[bool]) -> list[int]:
        """Record one frame (codebook-0 code and whether each row made it); returns the rows to end now."""
        if not self.history:
            self.history = [[] for _ in self.caps]
        ended = []
        for row, (code, made) in enumerate(zip(channel0, active)):
            if not made or row in self.stops:
                continue
            self.history[row].append(int(code))
            reason = self._reason(row)
            if reason is not None:
                self.stops[row] = GuardStop(row, reason, len(self.history[row]))
                ended.append(row)
        return ended

    def _reason(self, row: int) -> Optional[str]:
        codes = self.history[row]
        if self.caps[row] is not None and len(codes) >= self.caps[row]:
            return FRAME_CAP
        if is_silent(codes):
            return SILENCE
        if loop_period(codes) is not None:
            return LOOP
        return None


def describe_stops(stops: Sequence[Optional[GuardStop]], chunks: Sequence[str], log: bool = True) -> list[dict]:
    """Result entries {"chunk", "reason", "frames", "text"} for the chunks a guard ended, and (with `log`) one
    WARNING for them (the engine logs its own, per chunk)."""
    entries = [{"chunk": index, "reason": stop.reason, "frames": stop.frames, "text": chunks[index]}
               for index, stop in enumerate(stops) if stop is not None]
    if entries and log:
        logger.warning("%d of %d chunk(s) ended early by a runaway guard: %s", len(entries), len(chunks),
                       "; ".join(f"chunk {e['chunk']} ({e['reason']} after {e['frames']} frames)" for e in entries))
    return entries


__all__ = ["CAP_MARGIN_SECONDS", "FRAME_CAP", "FRAMES_PER_SECOND", "GuardStop", "LOOP", "LOOP_MATCH",
           "LOOP_MAX_PERIOD", "LOOP_MIN_FRAMES", "LOOP_MIN_REPEATS", "RunawayGuard", "SILENCE", "SILENCE_FRAMES",
           "SILENCE_MAX_DISTINCT", "SLOWEST_SYLLABLES_PER_SECOND", "describe_stops", "frame_cap", "is_silent",
           "loop_period", "syllable_count"]
