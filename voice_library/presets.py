"""Preset reference voices: which upstream clips they are, where they live, and the one table of OpenAI voice names.

Source. Upstream OpenMOSS/MOSS-TTS-Nano (GitHub, Apache-2.0) bundles demo reference clips in `assets/audio/`; its own
OpenAI endpoint (`openai_audio_api.py`) maps OpenAI's names onto some of them. The presets here are those clips, pinned
to upstream commit PRESET_REVISION and fetched by `python infer_npu.py --download-only` into the model folder's
`preset_voices/` (never committed: `.gitignore` keeps *.wav out). Left out on purpose: upstream's `zh_11.wav`, which
upstream labels with the name of a well-known actress (no clip of an identifiable public figure here).

Checksums. The full sha256 is known for two clips: `zh_1.wav` (the digest matches an independent third-party pin of
the same upstream file at commit 11619374 and the copy in the team's shared assets) and `en_2.wav` (the digest of the
copy in the team's shared assets, which are upstream's demo clips). For the other clips no digest or size is published
anywhere this project could check, so none is invented: the size and sha256 seen at the first download are recorded
in `preset_voice_library/presets.lock.json` (trust on first use) and every later check compares against that record.

Fallback. A preset that is not installed (offline, never downloaded, a failed fetch) does not break the OpenAI names:
`VoiceCatalog` (voice_library/catalog.py) answers them with the configured default voice and says which voice it used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..audio_io import write_atomically

logger = logging.getLogger(__name__)

PRESET_SUBFOLDER = "preset_voices"
PRESET_LOCK_FILE = "presets.lock.json"
PRESET_REPOSITORY = "OpenMOSS/MOSS-TTS-Nano"
# The upstream commit whose openai_audio_api.py maps OpenAI names onto these clips.
PRESET_REVISION = "a843f17b7badeba6b0b36907cbdcc0beea0f49e7"
PRESET_LICENSE = "Apache-2.0"
DOWNLOAD_TIMEOUT_SECONDS = 30.0
# presets.lock.json key of a tiny repository's stand-in clips (measurement/checkpoints.py, write_stand_in_presets)
STAND_IN_KEY = "stand_in"
MAX_PRESET_BYTES = 16 * 2**20  # a demo clip is well under 1 MB; anything larger is not the file we pinned


@dataclass(frozen=True)
class PresetClip:
    """One upstream demo clip: the voice name it gets here, its upstream path and what is known of its bytes."""

    name: str
    path: str
    language: str
    sha256: Optional[str] = None
    size: Optional[int] = None

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{PRESET_REPOSITORY}/{PRESET_REVISION}/{self.path}"

    @property
    def filename(self) -> str:
        return f"{self.name}.wav"


PRESET_CLIPS: tuple[PresetClip, ...] = (
    PresetClip("en_2", "assets/audio/en_2.wav", "en",
               "959cce9498f2bae964ca67136c2c02c7174922813b69aa435b27ec8759b44992", 694_618),
    PresetClip("en_3", "assets/audio/en_3.wav", "en"),
    PresetClip("en_4", "assets/audio/en_4.wav", "en"),
    PresetClip("zh_1", "assets/audio/zh_1.wav", "zh",
               "f64a53490acf7337358832d1da7c562e08e2f3caf4385727b318cdc4f4da50d2", 314_286),
    PresetClip("zh_3", "assets/audio/zh_3.wav", "zh"),
    PresetClip("zh_4", "assets/audio/zh_4.wav", "zh"),
    PresetClip("zh_6", "assets/audio/zh_6.wav", "zh"),
    PresetClip("zh_10", "assets/audio/zh_10.wav", "zh"),
)
PRESETS = {clip.name: clip for clip in PRESET_CLIPS}

# The one table of OpenAI's voice names -> preset. English clients are the common case, so most names speak English.
OPENAI_VOICES: dict[str, str] = {
    "alloy": "en_2", "ash": "en_4", "ballad": "zh_10", "coral": "en_3", "echo": "en_4", "fable": "zh_4",
    "nova": "zh_6", "onyx": "en_4", "sage": "zh_1", "shimmer": "en_3", "verse": "zh_3", "marin": "en_2",
    "cedar": "zh_1",
}
# What serve.py --default-voice and infer_npu.py use when no voice is given (the pinned English clip).
DEFAULT_VOICE = "en_2"
# Languages the model speaks (upstream model card); Wyoming's describe lists them.
LANGUAGES = ("en", "zh")


def preset_folder(model_folder) -> Path:
    return Path(model_folder) / PRESET_SUBFOLDER


def preset_clip(model_folder, name: str, default: str = DEFAULT_VOICE) -> tuple[str, Path]:
    """(preset used, its clip) for a preset or OpenAI voice name in a model folder; an OpenAI name whose preset is not
    installed falls back to `default`. infer_npu.py's --voice (its messages name the flag).

    Raises:
        ValueError: an unknown name, or no installed clip for it (saying how to get the presets).
    """
    if name not in PRESETS and name not in OPENAI_VOICES:
        raise ValueError(f"--voice {name!r} is not a preset or an OpenAI voice name; expected one of "
                         f"{', '.join(sorted({*PRESETS, *OPENAI_VOICES}))}")
    folder = preset_folder(model_folder)
    candidates = [OPENAI_VOICES.get(name, name)] + ([default] if name in OPENAI_VOICES else [])
    for preset in candidates:
        if (folder / f"{preset}.wav").is_file():
            return preset, folder / f"{preset}.wav"
    raise ValueError(f"--voice {name!r}: no preset clip in {folder} (get the presets with `python infer_npu.py "
                     "--download-only`, or give a voice recording with --prompt-audio-path)")


def fetch_presets(model_folder, clips=PRESET_CLIPS, opener=urllib.request.urlopen,
                  download: bool = True) -> dict[str, str]:
    """Download missing preset clips into `model_folder/preset_voices`, checking each (returns name -> outcome).

    A clip already in place is verified again; download=False only verifies. After the first failed connection the
    other downloads are skipped (no network: one failure, not one timeout per clip). Failures are reported per clip
    (the OpenAI names then fall back to the default voice), never raised, so that a missing demo clip does not undo
    the weights' download. A folder of stand-in presets (measurement.checkpoints.write_stand_in_presets) is left as it
    is.
    """
    folder = preset_folder(model_folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _read_lock(folder)
    if lock.get(STAND_IN_KEY):
        return {clip.name: "stand-in (a tiny test repository; not replaced)" for clip in clips}
    outcomes, unreachable = {}, None
    for clip in clips:
        try:
            outcomes[clip.name] = _ensure_clip(folder, clip, lock, opener, download and unreachable is None)
        except urllib.error.URLError as error:
            unreachable = outcomes[clip.name] = f"not installed: no connection to raw.githubusercontent.com ({error})"
        except (OSError, ValueError) as error:
            outcomes[clip.name] = f"not installed: {error}"
            logger.warning("preset voice %s: %s", clip.name, error)
    write_atomically(folder / PRESET_LOCK_FILE,
                     lambda temporary: Path(temporary).write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n"))
    return outcomes


def _ensure_clip(folder: Path, clip: PresetClip, lock: dict, opener, download: bool) -> str:
    target = folder / clip.filename
    if target.exists():
        _check(clip, target.read_bytes(), lock)
        return "ok (in place)"
    if not download:
        return "not installed (not downloaded)"
    with opener(clip.url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
        data = response.read(MAX_PRESET_BYTES + 1)
    _check(clip, data, lock)
    write_atomically(target, lambda temporary: Path(temporary).write_bytes(data))
    return "ok (downloaded)"


def _check(clip: PresetClip, data: bytes, lock: dict) -> None:
    """ValueError unless `data` matches the pin, or the lock's record of the first download (recorded when new)."""
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    if size > MAX_PRESET_BYTES:
        raise ValueError(f"{clip.url} is over {MAX_PRESET_BYTES} bytes; expected a short demo clip")
    expected = {"sha256": clip.sha256, "size": clip.size} if clip.sha256 else lock.get(clip.name)
    if expected is None:
        lock[clip.name] = {"sha256": digest, "size": size, "source": clip.url}
        logger.info("preset voice %s: recorded sha256 %s (%d bytes) on first download", clip.name, digest, size)
        return
    if (expected["sha256"], expected["size"]) != (digest, size):
        raise ValueError(f"{clip.filename} has sha256 {digest} ({size} bytes); expected {expected['sha256']} "
                         f"({expected['size']} bytes)")


def mark_stand_ins(model_folder) -> None:
    """Record that the presets of `model_folder` are stand-ins, so that fetch_presets leaves them alone."""
    path = preset_folder(model_folder) / PRESET_LOCK_FILE
    path.write_text(json.dumps({STAND_IN_KEY: True}) + "\n")


def _read_lock(folder: Path) -> dict:
    try:
        return json.loads((folder / PRESET_LOCK_FILE).read_text())
    except FileNotFoundError:
        return {}


__all__ = ["DEFAULT_VOICE", "LANGUAGES", "OPENAI_VOICES", "PRESETS", "PRESET_CLIPS", "PRESET_LICENSE",
           "PRESET_REVISION", "PRESET_SUBFOLDER", "PresetClip", "fetch_presets", "mark_stand_ins", "preset_clip",
           "preset_folder"]
