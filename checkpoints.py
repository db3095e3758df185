"""Tiny checkpoints in the upstream format, for tests, `verify_npu.py --tiny`, benchmarks and the README example.

The upstream `pytorch_model.bin` (spec tts.md §2.2, §3.4) is a `torch.save` of the full state_dict: every key,
including the 17 tied duplicates (`text_lm_head.weight`, `audio_lm_heads.{c}.weight`), in state-dict order, stored
in 16 bits, with each tied pair sharing one storage. `save_upstream_checkpoint` writes exactly that layout, and
`write_model_repository` adds what `AutoModel.from_pretrained(folder, trust_remote_code=True)` needs offline: a
config.json with `auto_map`, this repository's library modules and, optionally, the tokenizer files.

Command line (prints the folder):

    python checkpoints.py OUT_DIR [--tokenizer PATH/tokenizer.model] [--seed 0] [--dtype bfloat16]

then

    python -c "from transformers import AutoModel; m = AutoModel.from_pretrained('OUT_DIR', trust_remote_code=True)"
"""

if __name__ == "__main__" and not __package__:
    # Run as a script: import this file as part of the repository package so its relative imports work.
    from local_package import import_module

    raise SystemExit(import_module("checkpoints").main())

import argparse
import collections
import copy
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Mapping

import torch

from .configuration_moss_tts_nano import RELEASED_GPT2_CONFIG, MossTTSNanoConfig

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
CHECKPOINT_NAME = "pytorch_model.bin"
# The golden tiny shape (shared/golden/README.md): 2 layers, 64 wide, 4 heads, released ids and vocabulary.
TINY_GPT2_CONFIG = {"n_embd": 64, "n_head": 4, "n_inner": 128, "n_layer": 2}
# Root files that are scripts or test helpers, not library modules of the model repository.
NON_LIBRARY_FILES = {"checkpoints.py", "local_package.py", "infer_npu.py", "verify_npu.py", "bench.py", "serve.py",
                     "loadtest.py", "setup.py"}
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Upstream state-dict order: global decoder, audio embeddings, text head, audio heads, local decoder.
_KEY_GROUPS = ("transformer.", "audio_embeddings.", "text_lm_head.", "audio_lm_heads.", "local_transformer.")


def tiny_config(**overrides) -> MossTTSNanoConfig:
    """The golden tiny config: n_embd 64, 4 heads, n_inner 128, 2 layers; released ids, vocabulary and n_vq 16.

    Args:
        overrides: MossTTSNanoConfig arguments, or GPT2Config fields (e.g. n_layer=1), which go to gpt2_config.

    Returns:
        A MossTTSNanoConfig with both attention requests "sdpa".
    """
    gpt2 = dict(RELEASED_GPT2_CONFIG, **TINY_GPT2_CONFIG)
    for key in list(overrides):
        if key in gpt2 or key in TINY_GPT2_CONFIG:
            gpt2[key] = overrides.pop(key)
    values = {"attn_implementation": "sdpa", "local_transformer_attn_implementation": "sdpa"}
    values.update(overrides)
    return MossTTSNanoConfig(gpt2_config=gpt2, **values)


def tied_keys(n_vq: int) -> dict[str, str]:
    """{head key: embedding key} of the 17 (1 + n_vq) tied pairs."""
    tied = {"text_lm_head.weight": "transformer.wte.weight"}
    tied.update({f"audio_lm_heads.{c}.weight": f"audio_embeddings.{c}.weight" for c in range(n_vq)})
    return tied


def upstream_state_dict(model_or_state_dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The upstream layout of a model or state_dict: all keys in upstream order, tied keys sharing storage.

    Missing tied keys are filled from their embeddings; a tensor shared by several keys is converted once, so the
    keys keep sharing one storage after the cast to `dtype`.
    """
    is_model = isinstance(model_or_state_dict, torch.nn.Module)
    source_state = model_or_state_dict.state_dict() if is_model else model_or_state_dict
    source = dict(source_state)
    n_vq = sum(1 for key in source if key.startswith("audio_embeddings."))
    for head, embedding in tied_keys(n_vq).items():
        if head not in source and embedding in source:
            source[head] = source[embedding]
    converted: dict[tuple, torch.Tensor] = {}
    result = collections.OrderedDict()
    metadata = getattr(source_state, "_metadata", None)
    if metadata is not None:  # module versions, saved by torch.save of a state_dict() like upstream's
        result._metadata = copy.deepcopy(metadata)
    for key in sorted(source, key=_key_rank(list(source))):
        tensor = source[key]
        identity = (id(tensor),) if tensor.data_ptr() == 0 else (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if identity not in converted:
            converted[identity] = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        result[key] = converted[identity]
    return result


def _key_rank(keys: list[str]):
    """Sort key: the upstream group of a key, then its original position."""
    position = {key: index for index, key in enumerate(keys)}

    def rank(key: str) -> tuple[int, int]:
        group = next((i for i, prefix in enumerate(_KEY_GROUPS) if key.startswith(prefix)), len(_KEY_GROUPS))
        return group, position[key]

    return rank


def save_upstream_checkpoint(model_or_state_dict, folder, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `folder/pytorch_model.bin` exactly as upstream ships it (all keys, 16-bit, tied storage shared).

    Args:
        model_or_state_dict: a MossTTSNanoForCausalLM or its state_dict (tied keys may be missing).
        folder: created if needed.
        dtype: torch.bfloat16 (default) or torch.float16; the release is one of the two (spec §3.4).

    Returns:
        The path of the written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    torch.save(upstream_state_dict(model_or_state_dict, dtype), path)
    return path


def write_model_repository(
    folder, config: MossTTSNanoConfig, state_dict: Mapping[str, torch.Tensor], tokenizer_model=None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Make `folder` a model repository that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads offline.

    It holds config.json (with this repository's `auto_map`), the repository's library modules, pytorch_model.bin
    in the upstream format and, when `tokenizer_model` is given, tokenizer.model plus the tokenizer json files.

    Args:
        folder: destination (created if needed).
        config: the model's config.
        state_dict: weights (or a model), e.g. `model.state_dict()`.
        tokenizer_model: path of a SentencePiece tokenizer.model, or None.
        dtype: checkpoint dtype (16-bit like the release).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["auto_map"] = json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    config_dict["architectures"] = ["MossTTSNanoForCausalLM"]
    # Like the release: weights stored in 16 bits, loaded (upcast) as float32 unless the caller asks otherwise.
    config_dict["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    for source in sorted(REPO_ROOT.glob("*.py")):
        if source.name not in NON_LIBRARY_FILES:
            shutil.copy2(source, folder / source.name)
    if tokenizer_model is not None:
        shutil.copy2(tokenizer_model, folder / "tokenizer.model")
        for name in TOKENIZER_FILES:
            shutil.copy2(REPO_ROOT / name, folder / name)
    save_upstream_checkpoint(state_dict, folder, dtype)
    return folder


def random_tiny_model(seed: int = 0, **overrides):
    """A randomly initialised tiny MossTTSNanoForCausalLM (seeded), in eval mode."""
    from .modeling_moss_tts_nano import MossTTSNanoForCausalLM

    torch.manual_seed(seed)
    return MossTTSNanoForCausalLM(tiny_config(**overrides)).eval()


def load_safetensors_model(folder, dtype: torch.dtype = torch.float32):
    """A model from a folder holding config.json and model.safetensors (e.g. shared/golden/tts_tiny).

    safetensors files leave out the 17 tied keys (it refuses shared storage); they are filled from their embeddings,
    and the load is strict otherwise.

    Args:
        folder: the folder.
        dtype: the model dtype.

    Returns:
        MossTTSNanoForCausalLM in eval mode, ties intact.
    """
    from safetensors.torch import load_file

    from .modeling_moss_tts_nano import MossTTSNanoForCausalLM

    folder = Path(folder)
    config = MossTTSNanoConfig.from_pretrained(folder)
    model = MossTTSNanoForCausalLM(config)
    model.load_state_dict(upstream_state_dict(load_file(folder / "model.safetensors"), torch.float32), strict=True)
    model._tie_weights()
    return model.to(dtype).eval()


def main(argv=None) -> int:
    """CLI: write a random tiny model repository to OUT_DIR and print its path."""
    parser = argparse.ArgumentParser(description="Write a tiny random MOSS-TTS-Nano repository (upstream format).")
    parser.add_argument("out_dir", help="destination folder")
    parser.add_argument("--tokenizer", default=None, help="path of tokenizer.model to include (optional)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="checkpoint dtype")
    args = parser.parse_args(argv)
    model = random_tiny_model(args.seed)
    folder = write_model_repository(args.out_dir, model.config, model.state_dict(), args.tokenizer,
                                    getattr(torch, args.dtype))
    sys.stdout.write(f"{folder}\n")
    return 0


__all__ = [
    "load_safetensors_model",
    "random_tiny_model",
    "save_upstream_checkpoint",
    "tied_keys",
    "tiny_config",
    "upstream_state_dict",
    "write_model_repository",
]
