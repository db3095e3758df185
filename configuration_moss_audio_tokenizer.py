"""Configuration of MOSS-Audio-Tokenizer-Nano, the 48 kHz stereo codec used by MOSS-TTS-Nano.

`MossAudioTokenizerConfig` reads the released codec `config.json` unchanged: the upstream field names, their aliases
(`sample_rate`, `channels_numbers`, `attention_backend`, `codec_compute_dtype`) and the informational fields
(`code_dim`, `reversed_decoder_kwargs`, the training-only quantizer weights). Unlike upstream, the defaults here are
the released Nano model (spec codec.md §2-§3), so `MossAudioTokenizerConfig()` builds the real 374-tensor layout.
"""

import copy
from typing import Any

try:  # transformers >= 5 spells it PreTrainedConfig; 4.57 only has PretrainedConfig.
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers import PretrainedConfig as _BaseConfig

PATCH_MODULE = "PatchedPretransform"
TRANSFORMER_MODULE = "Transformer"
# The compute_dtype values upstream's config accepts (names in devices.DTYPES_BY_NAME).
COMPUTE_DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _patch_entry(patch_size: int) -> dict:
    return {"module_type": PATCH_MODULE, "patch_size": patch_size}


def _transformer_entry(input_dim: int, output_dim: int, num_layers: int, context_duration: float) -> dict:
    """One ProjectedTransformer entry as written in the released config.json (keys in the file's order)."""
    return {
        "causal": True,
        "context_duration": context_duration,
        "conv_layout": True,
        "d_model": 256,
        "dim_feedforward": 1024,
        "gating": "none",
        "input_dimension": input_dim,
        "layer_scale": 0.01,
        "max_period": 10000,
        "module_type": TRANSFORMER_MODULE,
        "norm": "layer_norm",
        "num_heads": 4,
        "num_layers": num_layers,
        "output_dimension": output_dim,
        "positional_embedding": "rope",
    }


# The released Nano stacks (spec codec.md §2.2 and §2.4): token rates 400/200/100/50 Hz in the encoder.
RELEASED_ENCODER_KWARGS = [
    _patch_entry(240),
    _transformer_entry(240, 384, 4, 4.0),
    _patch_entry(2),
    _transformer_entry(768, 384, 2, 6.0),
    _patch_entry(2),
    _transformer_entry(768, 384, 2, 8.0),
    _patch_entry(2),
    _transformer_entry(768, 192, 4, 10.0),
    _patch_entry(4),
]
RELEASED_DECODER_KWARGS = [
    _patch_entry(4),
    _transformer_entry(192, 768, 4, 10.0),
    _patch_entry(2),
    _transformer_entry(384, 768, 2, 8.0),
    _patch_entry(2),
    _transformer_entry(384, 768, 2, 6.0),
    _patch_entry(2),
    _transformer_entry(384, 240, 4, 4.0),
    _patch_entry(240),
]
RELEASED_QUANTIZER_KWARGS = {
    "codebook_dim": 8,
    "codebook_loss_weight": 1.0,
    "codebook_size": 1024,
    "commitment_loss_weight": 0.25,
    "input_dim": 768,
    "num_quantizers": 16,
    "output_dim": 768,
    "quantizer_dropout": 1.0,
    "quantizer_type": "rlfq",
    "rvq_dim": 512,
}


def decoder_from_reversed(reversed_kwargs: list[dict]) -> list[dict]:
    """Mirror an encoder-ordered stack into a decoder: reverse the order and swap each transformer's in/out dims.

    Upstream uses `reversed_decoder_kwargs` this way only when `decoder_kwargs` is absent (codec.md §8 item 9).
    """
    mirrored = []
    for entry in reversed(reversed_kwargs):
        entry = dict(entry)
        if entry.get("module_type") == TRANSFORMER_MODULE:
            entry["input_dimension"], entry["output_dimension"] = entry["output_dimension"], entry["input_dimension"]
        mirrored.append(entry)
    return mirrored


def _pick_alias(kwargs: dict, name: str, alias: str, value: Any, default: Any) -> Any:
    """Resolve `name` given its upstream alias in `kwargs`; both given and different is a user error."""
    alias_value = kwargs.pop(alias, None)
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; expected equal values")
    if value is not None:
        return value
    return alias_value if alias_value is not None else default


def _check_stack(name: str, stack: list[dict]) -> None:
    for index, entry in enumerate(stack):
        module_type = entry.get("module_type")
        if module_type not in (PATCH_MODULE, TRANSFORMER_MODULE):
            raise ValueError(
                f"{name}[{index}].module_type={module_type!r}; expected {PATCH_MODULE!r} or {TRANSFORMER_MODULE!r}"
            )
        if module_type == TRANSFORMER_MODULE and entry["d_model"] % entry["num_heads"]:
            raise ValueError(f"{name}[{index}]: d_model={entry['d_model']} is not a multiple of num_heads")


class MossAudioTokenizerConfig(_BaseConfig):
    """Configuration of `MossAudioTokenizerModel` (MOSS-Audio-Tokenizer-Nano).

    Args:
        sampling_rate: Audio sample rate in Hz (alias `sample_rate`).
        downsample_rate: Samples per channel per code frame (3840 = 80 ms at 48 kHz).
        causal_transformer_context_duration: Upstream fallback window in seconds, used only by transformer entries
            without their own `context_duration`.
        number_channels: Audio channels (alias `channels_numbers`).
        enable_channel_interleave: Interleave the channels sample by sample into one stream before the encoder.
        attention_implementation: "sdpa" (default), "eager"; "flash_attention_2" is accepted and runs the exact
            windowed SDPA path (alias `attention_backend`).
        compute_dtype: "fp32", "bf16" or "fp16": recorded only; call `model.set_compute_dtype` to use it
            (alias `codec_compute_dtype`).
        code_dim: Informational, unused (the encoder output width).
        encoder_kwargs / decoder_kwargs: The module stacks (patch layers and ProjectedTransformers).
        quantizer_type: Must be "rlfq".
        quantizer_kwargs: input_dim, rvq_dim, output_dim, num_quantizers, codebook_size, codebook_dim.
        reversed_decoder_kwargs: Stored unchanged; used only to derive the decoder when `decoder_kwargs` is absent.
        initializer_range: Std of the normal init of freshly created weights.
    """

    model_type = "moss-audio-tokenizer"

    def __init__(
        self,
        sampling_rate: int | None = None,
        downsample_rate: int = 3840,
        causal_transformer_context_duration: float = 10.0,
        number_channels: int | None = None,
        enable_channel_interleave: bool = True,
        attention_implementation: str | None = None,
        compute_dtype: str | None = None,
        code_dim: int = 768,
        encoder_kwargs: list[dict] | None = None,
        decoder_kwargs: list[dict] | None = None,
        quantizer_type: str = "rlfq",
        quantizer_kwargs: dict | None = None,
        reversed_decoder_kwargs: list[dict] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        kwargs.pop("model_type", None)  # upstream drops it too: the class constant wins
        self.sampling_rate = _pick_alias(kwargs, "sampling_rate", "sample_rate", sampling_rate, 48000)
        self.number_channels = _pick_alias(kwargs, "number_channels", "channels_numbers", number_channels, 2)
        self.attention_implementation = _pick_alias(
            kwargs, "attention_implementation", "attention_backend", attention_implementation, "sdpa"
        )
        self.compute_dtype = _pick_alias(kwargs, "compute_dtype", "codec_compute_dtype", compute_dtype, "fp32")
        if self.compute_dtype not in COMPUTE_DTYPE_NAMES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected one of {COMPUTE_DTYPE_NAMES}")
        if quantizer_type != "rlfq":
            raise ValueError(f"quantizer_type={quantizer_type!r}; only 'rlfq' (residual LFQ) is supported")
        self.downsample_rate = downsample_rate
        self.causal_transformer_context_duration = causal_transformer_context_duration
        self.enable_channel_interleave = enable_channel_interleave
        self.code_dim = code_dim
        self.quantizer_type = quantizer_type
        self.initializer_range = initializer_range
        self.encoder_kwargs = copy.deepcopy(encoder_kwargs if encoder_kwargs is not None else RELEASED_ENCODER_KWARGS)
        self.reversed_decoder_kwargs = copy.deepcopy(reversed_decoder_kwargs)
        if decoder_kwargs is None:
            decoder_kwargs = (
                decoder_from_reversed(reversed_decoder_kwargs) if reversed_decoder_kwargs else RELEASED_DECODER_KWARGS
            )
        self.decoder_kwargs = copy.deepcopy(decoder_kwargs)
        self.quantizer_kwargs = {**RELEASED_QUANTIZER_KWARGS, **(quantizer_kwargs or {})}
        _check_stack("encoder_kwargs", self.encoder_kwargs)
        _check_stack("decoder_kwargs", self.decoder_kwargs)
        super().__init__(**kwargs)

    @property
    def num_quantizers(self) -> int:
        """Number of residual codebooks (16 for the release)."""
        return int(self.quantizer_kwargs["num_quantizers"])

    @property
    def codebook_size(self) -> int:
        """Entries per codebook (1024 for the release)."""
        return int(self.quantizer_kwargs["codebook_size"])

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5 for the release)."""
        return self.sampling_rate / self.downsample_rate


__all__ = ["MossAudioTokenizerConfig", "RELEASED_ENCODER_KWARGS", "RELEASED_DECODER_KWARGS"]
