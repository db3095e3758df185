"""Captions: when each chunk (sentence) of a request is heard, and WebVTT for them.

A request's audio is its chunks' audio with a pause after every chunk but the last (text_chunking.py), so a chunk's
caption starts where its audio starts and ends where its audio ends (the pause is silence, not captioned).
`CaptionTimeline` follows audio as it is produced (the engine's audio events, or the SSE stream) and returns each
chunk's caption once its audio is complete; `chunk_captions` computes the same from the chunks' lengths after the
fact; `to_webvtt` writes them as a WebVTT file (infer_npu.py --captions).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .audio_io import write_atomically


@dataclass(frozen=True)
class Caption:
    """One chunk's text and its start / end in seconds from the start of the request's audio."""

    index: int
    text: str
    start: float
    end: float

    def as_dict(self) -> dict:
        return asdict(self)


class CaptionTimeline:
    """Per-chunk captions from audio pieces in playback order.

    Args:
        texts: each chunk's text, in order.
        sample_rate: samples per second of the pieces.
        speed: playback speed applied after generation (times are divided by it).
    """

    def __init__(self, texts: Sequence[str], sample_rate: int, speed: float = 1.0) -> None:
        if sample_rate <= 0 or speed <= 0:
            raise ValueError(f"sample_rate={sample_rate!r}, speed={speed!r}; expected positive numbers")
        self.texts, self.rate, self.speed = list(texts), sample_rate, speed
        self.samples, self.current, self.started = 0, None, 0
        self.done: list[Caption] = []

    def add(self, chunk_index: int, samples: int, is_pause: bool = False) -> Optional[Caption]:
        """Account for one piece of audio; returns the caption of a chunk that this piece shows is complete."""
        finished = None
        if self.current is not None and (is_pause or chunk_index != self.current):
            finished = self._close()
        if not is_pause and self.current is None:
            self.current, self.started = chunk_index, self.samples
        self.samples += samples
        return finished

    def finish(self) -> Optional[Caption]:
        """The last chunk's caption (None if it was already returned)."""
        return self._close() if self.current is not None else None

    def _close(self) -> Caption:
        index = self.current
        text = self.texts[index] if 0 <= index < len(self.texts) else ""
        caption = Caption(index, text, self._seconds(self.started), self._seconds(self.samples))
        self.done.append(caption)
        self.current = None
        return caption

    def _seconds(self, samples: int) -> float:
        return round(samples / self.rate / self.speed, 3)


def chunk_captions(texts: Sequence[str], chunk_samples: Sequence[int], pause_samples: Sequence[int],
                   sample_rate: int) -> list[Caption]:
    """Captions of chunks of `chunk_samples` samples each, `pause_samples[i]` of silence after chunk i."""
    timeline = CaptionTimeline(texts, sample_rate)
    for index, samples in enumerate(chunk_samples):
        timeline.add(index, samples)
        if index < len(pause_samples) and pause_samples[index] > 0:
            timeline.add(index, pause_samples[index], is_pause=True)
    timeline.finish()
    return timeline.done


def check_captions_target(target) -> None:
    """`captions` of inference: False, True (captions in the result) or a .vtt path (also written there).

    Raises:
        ValueError: anything else.
    """
    if isinstance(target, bool):
        return
    if not isinstance(target, (str, os.PathLike)) or Path(target).suffix.lower() != ".vtt":
        raise ValueError(f"captions={target!r}; expected True, False or a path ending in .vtt")


def add_captions(result: dict, captions: Sequence[Caption], target) -> None:
    """result["captions"] as dicts and, when `target` is a path, the WebVTT file there."""
    result["captions"] = [caption.as_dict() for caption in captions]
    if not isinstance(target, bool):
        write_webvtt(target, captions)


def to_webvtt(captions: Sequence[Caption]) -> str:
    """A WebVTT document with one cue per caption (empty chunks skipped)."""
    cues = ["WEBVTT", ""]
    for caption in captions:
        if caption.end <= caption.start:
            continue
        cues += [str(caption.index + 1), f"{_timestamp(caption.start)} --> {_timestamp(caption.end)}",
                 caption.text.replace("-->", "->"), ""]
    return "\n".join(cues)


def write_webvtt(path, captions: Sequence[Caption]) -> Path:
    """Write `to_webvtt(captions)` to `path` atomically (audio_io.write_atomically: a failed write leaves the old
    file and no temporary); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda temporary: Path(temporary).write_text(to_webvtt(captions), encoding="utf-8"))


def _timestamp(seconds: float) -> str:
    milliseconds = int(round(seconds * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


__all__ = ["Caption", "CaptionTimeline", "add_captions", "check_captions_target", "chunk_captions", "to_webvtt",
           "write_webvtt"]
