"""Shared test fixtures: the repository as a package, and the team's `../shared` folder when present.

Tests that need `../shared` (golden fixtures, the real tokenizer, reference clips, the fake NPU) skip with a reason
when it is absent, so that the suite passes on a user's fresh clone. Under CI (`CI=true`, as .ci/run sets it) a missing
`../shared` fails those tests instead: the golden parity checks must run there. `MOSS_SHARED_DIR` overrides its
location. Tests of an optional extra (Ray Serve: requirements-serve-ray.txt) import it with `optional_module`, which
skips them with the reason where it is missing, and fails them under CI.
"""

import importlib
import os
import sys
import tempfile
from pathlib import Path

# The test models are tiny: one thread per process avoids OpenMP spin contention (and the suite spawns children).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Kernel decisions (cpu_choices.py) go to a folder of this run, never to the user's cache; children inherit it.
os.environ.setdefault("MOSS_TTS_NANO_CACHE_DIR", tempfile.mkdtemp(prefix="moss_tts_nano_choices_"))

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from local_package import import_local_package, import_module  # noqa: E402

import_local_package()

SHARED_DIR = Path(os.environ.get("MOSS_SHARED_DIR", REPO_ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def shared_path(*parts: str) -> Path:
    """Path under ../shared; when it is missing, skip the calling test with the reason (fail it under CI)."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        reason = f"needs {path} (the team's shared/ folder beside the repository)"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it, so that the golden parity checks run", pytrace=False)
        pytest.skip(f"{reason}; absent on a fresh clone")
    return path


def optional_module(name: str, install: str):
    """Import module `name` of an optional extra; when it is missing, skip the calling test module with the reason
    (fail it under CI, which installs every extra)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"needs {name} ({install}): {error}"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true requires it, so that the tests of the extra run", pytrace=False)
        pytest.skip(f"{reason}; an optional extra, absent from a plain install", allow_module_level=True)


@pytest.fixture
def golden_tts_dir() -> Path:
    return shared_path("golden", "tts_tiny")


@pytest.fixture
def golden_codec_dir() -> Path:
    return shared_path("golden", "codec_tiny")


@pytest.fixture
def tokenizer_model_path() -> Path:
    return shared_path("assets", "tokenizer.model")


@pytest.fixture
def reference_clip() -> Path:
    return shared_path("assets", "audio", "en_2.wav")


@pytest.fixture
def reference_clips() -> list:
    """Both reference recordings (English en_2.wav, Chinese zh_1.wav; 44.1 kHz mono, about 8 s each)."""
    return [shared_path("assets", "audio", name) for name in ("en_2.wav", "zh_1.wav")]


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> Path:
    """The first 1.2 s of the English reference clip at its own rate (short, so the tiny codec encodes it fast)."""
    import soundfile as sf

    samples, rate = sf.read(str(shared_path("assets", "audio", "en_2.wav")), dtype="float32")
    path = tmp_path_factory.mktemp("prompt") / "prompt.wav"
    sf.write(str(path), samples[: int(1.2 * rate)], rate)
    return path


@pytest.fixture
def fake_npu_path() -> Path:
    return shared_path("tools", "fake_npu.py")


@pytest.fixture(scope="module")
def tokenizer():
    """The released SentencePiece tokenizer (shared/assets/tokenizer.model)."""
    tokenization = import_module("tokenization_moss_tts_nano")
    return tokenization.MossTTSNanoSentencePieceTokenizer(str(shared_path("assets", "tokenizer.model")))


# The CLI's sampled generation settings (upstream infer.py's applied values, spec tts.md §6.4), as the engine tests
# sample with them.
SAMPLED = dict(do_sample=True, audio_temperature=0.8, audio_top_p=0.95, audio_top_k=25,
               audio_repetition_penalty=1.2, text_temperature=1.0, text_top_p=1.0, text_top_k=50)


def text_prompt(rows: int, seed: int = 0, batch: int = 1, generator=None) -> torch.Tensor:
    """Prompt rows [batch, rows, 17] of random text ids and no audio, ending in audio_start (6) as a continuation
    prompt does; drawn from `generator` (default: a new one seeded with `seed`)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    ids = torch.full((batch, rows, 17), 1024)
    ids[:, :, 0] = torch.randint(10, 16000, (batch, rows), generator=generator)
    ids[:, -1, 0] = 6
    return ids


def int8_tiny(seed: int = 31):
    """A random tiny TTS in the int8 format whose stop logit always loses (checkpoints.force_continue): the model of
    the ONNX graph tests (onnx_graph.py)."""
    model = import_module("weight_formats").apply_weight_format(
        import_module("measurement.checkpoints").random_tiny_model(seed=seed), "int8")
    import_module("measurement.checkpoints").force_continue(model)
    return model


def audio_head_outputs(model, run) -> list:
    """Call `run()` and return what the model's audio heads computed meanwhile, in call order."""
    recorded = []
    hooks = [head.register_forward_hook(lambda module, args, output: recorded.append(output.clone()))
             for head in model.audio_lm_heads]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


__all__ = ["REPO_ROOT", "SHARED_DIR", "audio_head_outputs", "import_module", "optional_module", "shared_path",
           "text_prompt"]
