"""Tiny checkpoints in the upstream format, for tests, `verify_npu.py --tiny`, benchmarks and the README example.

The upstream `pytorch_model.bin` (spec tts.md §2.2, §3.4) is a `torch.save` of the full state_dict: every key,
including the 17 tied duplicates (`text_lm_head.weight`, `audio_lm_heads.{c}.weight`), in state-dict order, stored
in 16 bits, with each tied pair sharing one storage. `save_upstream_checkpoint` writes exactly that layout, and
`write_model_repository` adds what `AutoModel.from_pretrained(folder, trust_remote_code=True)` needs offline: a
config.json with `auto_map`, this repository's library modules and, optionally, the tokenizer files.

`write_runnable_repository` writes a complete tiny repository in the layout `python infer_npu.py --download-only`
produces: the TTS above, the codec in `audio_tokenizer/` (our MossAudioTokenizerModel with the upstream key names and
signal layout: 48 kHz stereo, hop 3840, 16 x 1024 codes, small widths like shared/golden/codec_tiny) and, when given,
the tokenizer. Its TTS always continues (greedy generation runs exactly max_new_frames frames, so output lengths are
exact: frames x 3840 samples) and its codec is scaled to speak at about -20 dBFS (random noise, but audible), so
`infer_npu.py` and `inference` run on it end to end. The tests use the same recipe. It also carries stand-in preset
voices (`preset_voices/`, one short synthetic clip per name of voice_library/presets.py's PRESET_CLIPS: a seeded buzz, no
speech), so that every OpenAI voice name and the default voice work with it offline.

The tiny builders (tiny_config, random_tiny_model, force_continue and the models built on it, tiny_codec) serve the
tests, `verify_npu.py --tiny` and bench.py. Command line: `python measurement/checkpoints.py OUT_DIR [--tokenizer tokenizer.model]
[--seed 0] [--dtype bfloat16]` writes a runnable repository and prints its folder (README, "From Python"). Without
--tokenizer it trains a tiny SentencePiece model offline (`write_tiny_tokenizer`: byte fallback, so any text encodes;
ids far below the model's 16384), so the recipe runs on a fresh clone without the download. Arguments are checked
before anything is written, and a folder the command created is removed again if writing fails.
"""

if __name__ == "__main__" and not __package__:
    # Run as a script (python measurement/checkpoints.py): import this file as part of the repository package, from
    # the repository root, so its relative imports work.
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from local_package import import_module

    raise SystemExit(import_module("measurement.checkpoints").main())

import argparse
import collections
import copy
import io
import json
import logging
import pickle
import shutil
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import soundfile as sf
import torch

from ..configuration_moss_tts_nano import RELEASED_GPT2_CONFIG, MossTTSNanoConfig, tied_weight_keys
from ..devices import parse_dtype
from ..voice_library.presets import PRESET_CLIPS, PRESET_LOCK_FILE, PRESET_SUBFOLDER, mark_stand_ins, preset_folder
from ..weights import CODEC_SUBFOLDER

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "pytorch_model.bin"
# The golden tiny shape (shared/golden/README.md): 2 layers, 64 wide, 4 heads, released ids and vocabulary.
TINY_GPT2_CONFIG = {"n_embd": 64, "n_head": 4, "n_inner": 128, "n_layer": 2}
# Root files that are scripts or the package helper, not modules of the model repository (the packages, server/ and
# the others, are never copied: remote code does not import them).
NON_LIBRARY_FILES = {"local_package.py", "infer_npu.py", "verify_npu.py", "bench.py", "serve.py", "serve_ray.py",
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


def upstream_state_dict(model_or_state_dict, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The upstream layout of a model or state_dict: all keys in upstream order, tied keys sharing storage.

    Missing tied keys are filled from their embeddings; a tensor shared by several keys is converted once, so the
    keys keep sharing one storage after the cast to `dtype`.
    """
    is_model = isinstance(model_or_state_dict, torch.nn.Module)
    source_state = model_or_state_dict.state_dict() if is_model else model_or_state_dict
    source = dict(source_state)
    n_vq = sum(1 for key in source if key.startswith("audio_embeddings."))
    for head, embedding in tied_weight_keys(n_vq).items():
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
    from ..modeling_moss_tts_nano import MossTTSNanoForCausalLM

    torch.manual_seed(seed)
    return MossTTSNanoForCausalLM(tiny_config(**overrides)).eval()


# How far force_continue puts the stop logit (id 7) below the continue logit (id 9), for every input.
STOP_MARGIN = 100.0
# Level the tiny codec is scaled to (RMS of decoded random codes), about -20 dBFS: clearly audible in 16 bits.
TINY_CODEC_RMS = 0.1
BLOCK_WEIGHT_GAIN = 3.0  # verification_tiny_model's gain of the block weights
# verification_tiny_model's stop margin: 1 logit keeps the audio_end row (in every voice-clone prompt) the size of an
# ordinary embedding row, so that 16-bit rows see ordinary numerics; it is exact in float32 and far above the 16-bit
# rounding of the margin (at most 0.008 in bfloat16 here). STOP_MARGIN makes that row ~100x larger than the others.
VERIFICATION_STOP_MARGIN = 1.0


def force_continue(model, margin: float = STOP_MARGIN) -> None:
    """Edit the weights so that the 2-way stop decision always picks "continue" (greedy runs every frame it is given).

    The text decision compares h·w9 with h·w7, h = local ln_f(x) = γ⊙n + β with n normalised (Σ n_i = 0). Setting
    w7 = w9 - k/γ makes h·w9 - h·w7 = k Σ n_i + k Σ β_i/γ_i = k Σ β_i/γ_i, the same for every input. β is first nudged
    (by less than 0.02 γ) so that Σ β_i/γ_i = 10, then k = margin / 10. Only the values of the audio_end row of the
    text embedding (id 7, absent from continuation prompts) and of the local ln_f bias change: shapes, ops and
    timing are those of a normal frame, so bench.py times real frames with it. Works on any size and weight format
    (the text head and the norms stay float).
    """
    norm, table = model.local_transformer.ln_f, model.transformer.wte.weight
    with torch.no_grad():
        gamma = norm.weight.float()
        safe = torch.where(gamma.abs() < 1e-3, torch.full_like(gamma, 1e-3).copysign(gamma), gamma)
        total = float((norm.bias.float() / safe).sum())
        target = 10.0
        norm.bias.add_(((target - total) / gamma.numel() * safe).to(norm.bias.dtype))
        shift = (margin / target) / safe
        table[7] = (table[9].float() - shift).to(table.dtype)


def always_continue_tiny_model(seed: int = 0, **overrides):
    """A random tiny TTS (random_tiny_model) that never stops: greedy runs exactly max_new_frames frames."""
    model = random_tiny_model(seed=seed, **overrides)
    force_continue(model)
    return model


def verification_tiny_model(seed: int = 0):
    """The --tiny model of verify_npu.py: a random tiny TTS whose blocks matter numerically, and which never stops.
    Block weights x BLOCK_WEIGHT_GAIN (random N(0, 0.02) blocks are near-identities, which would hide attention bugs);
    the local ln_f gets a larger gain and a random bias, so that the audio heads see a spread of values."""
    model = random_tiny_model(seed=seed)
    with torch.no_grad():
        for decoder in (model.transformer, model.local_transformer):
            for name, parameter in decoder.h.named_parameters():
                if name.endswith("weight") and parameter.dim() == 2:
                    parameter.mul_(BLOCK_WEIGHT_GAIN)
        model.local_transformer.ln_f.weight.mul_(4.0)
        model.local_transformer.ln_f.bias.normal_(std=2.0)
    force_continue(model, VERIFICATION_STOP_MARGIN)
    return model


def tiny_codec_config_dict(code_dim: int = 96, d_model: int = 32, contexts=(0.02, 0.04, 0.06, 0.08),
                           num_quantizers: int = 16, codebook_size: int = 1024, rvq_dim: int = 32) -> dict:
    """A tiny codec config with the released signal layout: 48 kHz stereo, hop 3840, patch sizes 240, 2, 2, 2, 4
    around four one-layer transformers each way. The defaults are the golden codec_tiny shape.

    Args:
        code_dim: encoder output width; the stages output code_dim / 2 (the last code_dim / 4, patched x4).
        d_model: transformer width (2 heads, feed-forward 2 x d_model).
        contexts: the encoder stages' windows in seconds (the decoder mirrors them).
        num_quantizers, codebook_size, rvq_dim: the quantizer.
    """
    half, quarter = code_dim // 2, code_dim // 4
    encoder = [_codec_patch(240), _codec_stage(240, half, contexts[0], d_model), _codec_patch(2),
               _codec_stage(code_dim, half, contexts[1], d_model), _codec_patch(2),
               _codec_stage(code_dim, half, contexts[2], d_model), _codec_patch(2),
               _codec_stage(code_dim, quarter, contexts[3], d_model), _codec_patch(4)]
    decoder = [_codec_patch(4), _codec_stage(quarter, code_dim, contexts[3], d_model), _codec_patch(2),
               _codec_stage(half, code_dim, contexts[2], d_model), _codec_patch(2),
               _codec_stage(half, code_dim, contexts[1], d_model), _codec_patch(2),
               _codec_stage(half, 240, contexts[0], d_model), _codec_patch(240)]
    quantizer = {"codebook_dim": 8, "codebook_loss_weight": 1.0, "codebook_size": codebook_size,
                 "commitment_loss_weight": 0.25, "input_dim": code_dim, "num_quantizers": num_quantizers,
                 "output_dim": code_dim, "quantizer_dropout": 1.0, "quantizer_type": "rlfq", "rvq_dim": rvq_dim}
    return {
        "sample_rate": 48000, "sampling_rate": 48000, "downsample_rate": 3840,
        "causal_transformer_context_duration": contexts[-1], "number_channels": 2, "enable_channel_interleave": True,
        "attention_implementation": "sdpa", "compute_dtype": "fp32", "code_dim": code_dim, "encoder_kwargs": encoder,
        "decoder_kwargs": decoder, "quantizer_type": "rlfq", "quantizer_kwargs": quantizer,
    }


def _codec_stage(input_dim: int, output_dim: int, context: float, d_model: int) -> dict:
    return {
        "module_type": "Transformer", "causal": True, "context_duration": context, "conv_layout": True,
        "d_model": d_model, "dim_feedforward": 2 * d_model, "gating": "none", "input_dimension": input_dim,
        "layer_scale": 0.01, "max_period": 10000, "norm": "layer_norm", "num_heads": 2, "num_layers": 1,
        "output_dimension": output_dim, "positional_embedding": "rope",
    }


def _codec_patch(size: int) -> dict:
    return {"module_type": "PatchedPretransform", "patch_size": size}


def tiny_codec(seed: int = 0):
    """A random tiny MossAudioTokenizerModel in eval mode whose decoded audio is audible (RMS about TINY_CODEC_RMS).

    The default init (normal, std 0.02) shrinks the signal at every projection, to about 1e-11 at the output, which
    16-bit files store as silence. Every Linear gets unit gain (std 1/sqrt(fan_in)) instead, and the last projection
    is scaled so that decoding seeded random codes gives TINY_CODEC_RMS.
    """
    from ..configuration_moss_audio_tokenizer import MossAudioTokenizerConfig
    from ..modeling_moss_audio_tokenizer import MossAudioTokenizerModel

    torch.manual_seed(seed)
    codec = MossAudioTokenizerModel(MossAudioTokenizerConfig(**tiny_codec_config_dict())).eval()
    linears = [module for module in codec.modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            torch.nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
        codes = torch.randint(0, 1024, (16, 25), generator=torch.Generator().manual_seed(seed))
        audio = codec.batch_decode([codes], num_quantizers=16, chunk_duration=None).audio
        codec.decoder[-2].output_proj.weight.mul_(TINY_CODEC_RMS / audio.pow(2).mean().sqrt())
    return codec


def write_runnable_repository(folder, tokenizer_model=None, seed: int = 0,
                              dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a complete tiny model repository (TTS, codec, tokenizer when given) to `folder` and return it.

    Args:
        folder: destination (created if needed).
        tokenizer_model: path of a SentencePiece tokenizer.model (needed to synthesise from text), or None.
        seed: seed of the random weights.
        dtype: checkpoint dtype of the TTS (16-bit like the release).

    Returns:
        The folder: `infer_npu.py --model-path folder --no-verify ...` and `AutoModel.from_pretrained(folder,
        trust_remote_code=True).inference(...)` run on it.
    """
    tts = always_continue_tiny_model(seed)
    folder = write_model_repository(folder, tts.config, tts.state_dict(), tokenizer_model=tokenizer_model, dtype=dtype)
    tiny_codec(seed).save_pretrained(str(Path(folder) / CODEC_SUBFOLDER))
    write_stand_in_presets(folder, seed)
    return folder


# Stand-in preset clips: STAND_IN_SECONDS of a buzz at STAND_IN_RATE (a pitch of its own per preset, plus noise).
STAND_IN_RATE = 24000
STAND_IN_SECONDS = 1.0


def write_stand_in_presets(folder, seed: int = 0) -> Path:
    """Write one synthetic clip per preset name into `folder`/preset_voices (not speech: a stand-in for tests and the
    tiny recipe, where the upstream clips may not be downloaded) and return that folder."""
    target = preset_folder(folder)
    target.mkdir(parents=True, exist_ok=True)
    time = np.arange(int(STAND_IN_RATE * STAND_IN_SECONDS)) / STAND_IN_RATE
    generator = np.random.default_rng(seed)
    for index, clip in enumerate(PRESET_CLIPS):
        pitch = 110.0 * 2 ** (index / 6)
        buzz = sum(np.sin(2 * np.pi * pitch * harmonic * time) / harmonic for harmonic in range(1, 6))
        audio = 0.2 * buzz / np.abs(buzz).max() + 0.01 * generator.standard_normal(time.size)
        sf.write(target / clip.filename, audio.astype(np.float32), STAND_IN_RATE, subtype="PCM_16")
    mark_stand_ins(folder)
    return target


# The tiny tokenizer: a SentencePiece BPE model trained on TINY_TOKENIZER_TEXT, with the released special pieces
# 0..3 (<unk>, <s>, </s>, <pad>) and byte fallback.
TINY_TOKENIZER_PIECES = 320
TINY_TOKENIZER_TEXT = (
    "Hello from MOSS-TTS-Nano.", "Hello world. This is a test.", "Streaming works too.", "Good morning.",
    "The quick brown fox jumps over the lazy dog.", "user", "assistant", "0123456789", "Hello there.",
)


def write_tiny_tokenizer(path) -> Path:
    """Train a tiny SentencePiece model (deterministic, offline, well under a second) and write it to `path`.

    It is not the released tokenizer (pieces differ, so text ids differ): a stand-in that lets the tiny repository
    speak any text without the 470 kB download.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TOKENIZER_TEXT * 3), model_writer=model, vocab_size=TINY_TOKENIZER_PIECES,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        character_coverage=1.0, normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def load_checkpoint(path) -> dict:
    """Tensors of a ``.safetensors`` or PyTorch ``.bin`` file, without ever running pickled code.

    Args:
        path: checkpoint file.

    Returns:
        dict name -> torch.Tensor on the CPU.

    Raises:
        ValueError: the ``.bin`` needs code execution to unpickle (``weights_only=True`` refused it).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"refusing to load {path}: it is not a plain tensor checkpoint ({error})") from error


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
    from ..modeling_moss_tts_nano import MossTTSNanoForCausalLM

    folder = Path(folder)
    config = MossTTSNanoConfig.from_pretrained(folder)
    model = MossTTSNanoForCausalLM(config)
    model.load_state_dict(upstream_state_dict(load_checkpoint(folder / "model.safetensors"), torch.float32))  # strict
    model._tie_weights()
    return model.to(dtype).eval()


def main(argv=None) -> int:
    """CLI: write a runnable tiny model repository to OUT_DIR and print its path."""
    parser = argparse.ArgumentParser(description="Write a tiny random MOSS-TTS-Nano repository (upstream format): the "
                                                 "TTS, the codec in audio_tokenizer/ and, with --tokenizer, the "
                                                 "tokenizer, so that infer_npu.py runs on it end to end.")
    parser.add_argument("out_dir", help="destination folder")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model to include (`python infer_npu.py --download-only` fetches the real one; "
                             "default: a tiny one trained offline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="checkpoint dtype (default bfloat16)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no such file; expected a SentencePiece tokenizer.model (or leave "
                     "--tokenizer out for a tiny one)")
    if out_dir.exists() and not (out_dir.is_dir() and _new_or_tiny(out_dir)):
        parser.error(f"out_dir {out_dir} exists and is not an empty folder or an earlier tiny repository; expected a "
                     "new folder")
    created = not out_dir.exists()
    try:
        folder = _write_cli_repository(out_dir, args)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    sys.stdout.write(f"{folder}\n")
    return 0


def _new_or_tiny(folder: Path) -> bool:
    """Empty, or written by this command before (its files are then replaced)."""
    return not any(folder.iterdir()) or (folder / PRESET_SUBFOLDER / PRESET_LOCK_FILE).is_file()


def _write_cli_repository(out_dir: Path, args) -> Path:
    """The CLI's repository: with the given tokenizer, or a tiny one trained into the folder first."""
    tokenizer = args.tokenizer
    if tokenizer is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = write_tiny_tokenizer(out_dir / "tiny_tokenizer.model")
    folder = write_runnable_repository(out_dir, tokenizer, args.seed, parse_dtype(args.dtype))
    if args.tokenizer is None:
        Path(tokenizer).unlink()  # copied into the repository as tokenizer.model
    return folder


__all__ = [
    "always_continue_tiny_model",
    "force_continue",
    "load_checkpoint",
    "load_safetensors_model",
    "random_tiny_model",
    "save_upstream_checkpoint",
    "tiny_codec",
    "tiny_codec_config_dict",
    "tiny_config",
    "upstream_state_dict",
    "verification_tiny_model",
    "write_model_repository",
    "write_stand_in_presets",
    "write_tiny_tokenizer",
    "write_runnable_repository",
]
