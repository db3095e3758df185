"""A tiny, complete model repository folder for pipeline and CLI tests (no network, seconds to build).

The folder has the layout that `python infer_npu.py --download-only` produces, with random tiny weights in the
upstream file formats:

    config.json, *.py, tokenizer.model (+ json)    TTS (checkpoints.write_model_repository; pytorch_model.bin)
    audio_tokenizer/config.json, model.safetensors  codec (our MossAudioTokenizerModel, upstream key names)

The TTS is the golden tiny shape. Its local decoder's final LayerNorm bias points along wte[9] - wte[7], so the
continue/stop decision always picks "continue": greedy generation runs exactly max_new_frames frames, which makes
output lengths exact (frames x 3840 samples). The codec has the real signal layout (48 kHz stereo, hop 3840, 16 x 1024
RLFQ codebooks) with small widths, like shared/golden/codec_tiny/config.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from conftest import import_module

checkpoints = import_module("checkpoints")
weights = import_module("weights")

HOP = 3840
SAMPLE_RATE = 48000
# The local ln_f bias along the continue direction: large enough that "continue" wins for any hidden state.
CONTINUE_BIAS = 60.0


def _stage(input_dim: int, output_dim: int, context: float) -> dict:
    return {
        "module_type": "Transformer", "causal": True, "context_duration": context, "conv_layout": True,
        "d_model": 32, "dim_feedforward": 64, "gating": "none", "input_dimension": input_dim, "layer_scale": 0.01,
        "max_period": 10000, "norm": "layer_norm", "num_heads": 2, "num_layers": 1, "output_dimension": output_dim,
        "positional_embedding": "rope",
    }


def _patch(size: int) -> dict:
    return {"module_type": "PatchedPretransform", "patch_size": size}


def tiny_codec_config_dict() -> dict:
    """The tiny codec config (golden codec_tiny shape): patch sizes 240, 2, 2, 2, 4; d_model 32; code_dim 96."""
    encoder = [_patch(240), _stage(240, 48, 0.02), _patch(2), _stage(96, 48, 0.04), _patch(2),
               _stage(96, 48, 0.06), _patch(2), _stage(96, 24, 0.08), _patch(4)]
    decoder = [_patch(4), _stage(24, 96, 0.08), _patch(2), _stage(48, 96, 0.06), _patch(2),
               _stage(48, 96, 0.04), _patch(2), _stage(48, 240, 0.02), _patch(240)]
    quantizer = {"codebook_dim": 8, "codebook_loss_weight": 1.0, "codebook_size": 1024,
                 "commitment_loss_weight": 0.25, "input_dim": 96, "num_quantizers": 16, "output_dim": 96,
                 "quantizer_dropout": 1.0, "quantizer_type": "rlfq", "rvq_dim": 32}
    return {
        "sample_rate": SAMPLE_RATE, "sampling_rate": SAMPLE_RATE, "downsample_rate": HOP,
        "causal_transformer_context_duration": 0.08, "number_channels": 2, "enable_channel_interleave": True,
        "attention_implementation": "sdpa", "compute_dtype": "fp32", "code_dim": 96, "encoder_kwargs": encoder,
        "decoder_kwargs": decoder, "quantizer_type": "rlfq", "quantizer_kwargs": quantizer,
    }


def tiny_codec(seed: int = 0):
    """A random tiny MossAudioTokenizerModel in eval mode."""
    configuration = import_module("configuration_moss_audio_tokenizer")
    modeling = import_module("modeling_moss_audio_tokenizer")
    torch.manual_seed(seed)
    return modeling.MossAudioTokenizerModel(configuration.MossAudioTokenizerConfig(**tiny_codec_config_dict())).eval()


def always_continue_tiny_tts(seed: int = 0):
    """A random tiny TTS whose text decision always continues (greedy runs exactly max_new_frames frames)."""
    model = checkpoints.random_tiny_model(seed=seed)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        direction = wte[9] - wte[7]
        model.local_transformer.ln_f.bias.copy_(CONTINUE_BIAS * direction / direction.norm())
    return model


def write_tiny_repository(folder, tokenizer_model, seed: int = 0) -> Path:
    """Write the tiny TTS + codec repository to `folder` and return it."""
    folder = Path(folder)
    tts = always_continue_tiny_tts(seed)
    checkpoints.write_model_repository(folder, tts.config, tts.state_dict(), tokenizer_model=tokenizer_model)
    tiny_codec(seed).save_pretrained(str(folder / weights.CODEC_SUBFOLDER))
    return folder


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
