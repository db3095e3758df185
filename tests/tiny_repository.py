"""The tiny, complete model repository of the pipeline and CLI tests: `checkpoints.write_runnable_repository`, the
recipe the README gives users, plus pins of its files for testing checksum verification.

Its TTS always continues (greedy runs exactly max_new_frames frames, so outputs are frames x HOP samples long) and its
codec has the real signal layout (48 kHz stereo, hop 3840, 16 x 1024 codebooks) and audible output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import import_module

checkpoints = import_module("measurement.checkpoints")
weights = import_module("weights")

HOP = checkpoints.tiny_codec_config_dict()["downsample_rate"]
SAMPLE_RATE = checkpoints.tiny_codec_config_dict()["sampling_rate"]
tiny_codec_config_dict = checkpoints.tiny_codec_config_dict


def write_tiny_repository(folder, tokenizer_model, seed: int = 0) -> Path:
    """Write the tiny TTS + codec + tokenizer repository to `folder` and return it."""
    return checkpoints.write_runnable_repository(folder, tokenizer_model, seed=seed)


def pins_for(folder) -> tuple:
    """Pins (size + sha256) for the tiny repository's files, for testing checksum verification."""
    folder = Path(folder)
    pins = []
    for name, target in (("tts_weights", "pytorch_model.bin"), ("tokenizer_model", "tokenizer.model"),
                         ("codec_weights", f"{weights.CODEC_SUBFOLDER}/model.safetensors")):
        data = (folder / target).read_bytes()
        pins.append(weights.PinnedFile(name, "tiny/test", "0" * 40, Path(target).name, target, len(data),
                                       hashlib.sha256(data).hexdigest()))
    return tuple(pins)


def pinned_copy_with_corrupt_weights(repository, folder) -> tuple[Path, tuple]:
    """A copy of `repository` in `folder` whose TTS weights have one flipped byte, and the pins of the intact copy
    (what settings.model_flags.PINS should be for the check to fail on exactly that file)."""
    import shutil

    copy = Path(shutil.copytree(repository, folder))
    pins = pins_for(copy)
    weights_file = copy / "pytorch_model.bin"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    return copy, pins
