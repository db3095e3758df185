"""Which voice a request's name means: uploads, then presets, then OpenAI's names, then the default voice.

    name given           what speaks
    an uploaded voice    the upload (an upload may take a preset's or an OpenAI name: it then replaces it)
    a preset (en_2 ...)  the preset clip of the model folder's preset_voices/
    an OpenAI name       its preset (presets.OPENAI_VOICES); when that preset is not installed, the default voice
    none                 the default voice
    anything else        UnknownVoiceError listing what exists

`resolve` returns the name of the voice actually used with its codes, so that the answer can say it (x-moss-voice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .presets import DEFAULT_VOICE, OPENAI_VOICES
from .store import UnknownVoiceError, VoiceStore, check_voice_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VoiceEntry:
    """One name of the listing: kind 'upload', 'preset' or 'openai'; `uses` the voice that speaks for it;
    `replaces` 'preset' or 'openai' when an upload took that name; `fallback` when `uses` is the default voice."""

    name: str
    kind: str
    uses: str
    replaces: Optional[str] = None
    fallback: bool = False


class VoiceCatalog:
    """Uploads (a VoiceStore), presets (a VoiceStore over the model's preset_voices/, or None) and the default voice.

    Raises (constructor): ValueError when `default_voice` is not a valid voice name.
    """

    def __init__(self, uploads: VoiceStore, presets: Optional[VoiceStore], default_voice: str = DEFAULT_VOICE):
        self.uploads, self.presets = uploads, presets
        self.default_voice = check_voice_name(default_voice)

    def resolve(self, name: Optional[str]) -> tuple[str, torch.Tensor]:
        """(the voice used, its prompt codes [T, n_vq]) for a requested name (None: the default voice).

        Raises:
            ValueError: a bad name or clip; UnknownVoiceError when nothing answers to the name.
        """
        if name is None:
            return self._direct(self.default_voice, "the default voice")
        check_voice_name(name)
        uploads, presets = set(self.uploads.list_voices()), self._preset_names()
        if name in uploads:
            return name, self.uploads.prompt_codes(name)
        if name in presets:
            return name, self.presets.prompt_codes(name)
        if name in OPENAI_VOICES:
            preset = OPENAI_VOICES[name]
            if preset in presets:
                return preset, self.presets.prompt_codes(preset)
            logger.info("voice %r: preset %r is not installed; using the default voice %r", name, preset,
                        self.default_voice)
            return self._direct(self.default_voice, f"the default voice (for {name!r}, whose preset {preset!r} is "
                                                    "not installed)")
        raise UnknownVoiceError(f"unknown voice {name!r}; expected one of: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries()]

    def entries(self) -> list[VoiceEntry]:
        """Every name a request may use, sorted by name: OpenAI's names only where their preset or the default voice
        is installed."""
        uploads, presets = set(self.uploads.list_voices()), self._preset_names()
        found = {name: VoiceEntry(name, "preset", name) for name in presets}
        default_installed = self.default_voice in uploads or self.default_voice in presets
        for name, preset in OPENAI_VOICES.items():
            installed = preset in presets
            if installed or default_installed:  # a name that nothing could answer is not offered
                found[name] = VoiceEntry(name, "openai", preset if installed else self.default_voice,
                                         fallback=not installed)
        for name in uploads:
            replaced = found[name].kind if name in found else None
            found[name] = VoiceEntry(name, "upload", name, replaces=replaced)
        return [found[name] for name in sorted(found)]

    def _direct(self, name: str, label: str) -> tuple[str, torch.Tensor]:
        if name in self.uploads.list_voices():
            return name, self.uploads.prompt_codes(name)
        if name in self._preset_names():
            return name, self.presets.prompt_codes(name)
        raise UnknownVoiceError(f"{label} {name!r} is neither an uploaded voice nor an installed preset; install the "
                                "presets with `python infer_npu.py --download-only`, upload a voice of that name, or "
                                "choose another default voice")

    def _preset_names(self) -> set[str]:
        return set(self.presets.list_voices()) if self.presets is not None else set()


__all__ = ["VoiceCatalog", "VoiceEntry"]
