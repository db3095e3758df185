"""MOSS-Audio-Tokenizer-Nano: an independent implementation that loads the upstream codec weights unchanged.

Signal path (spec codec.md §2): stereo 48 kHz -> channels interleaved into one 96 kHz stream -> patch layers (reshape)
and causal ProjectedTransformers with sliding-window attention -> residual LFQ quantizer (codec_quantizer.py, 16 x 1024
codes per 80 ms frame) -> the mirrored decoder -> de-interleave. Tensors inside the stacks are time-major [B, T, C];
the public API keeps upstream's layouts (audio [B, C, N], codes [nq, B, F], hidden states [B, D, F]).

Differences from upstream that keep its outputs (codec.md §8): attention is windowed offline (blocks of queries
against their window, never a dense T x T), streaming uses preallocated ring KV caches and decodes several frames per
pass, the quantizer stays fp32 whatever dtype the rest uses, and nothing here depends on the device type.
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .codec_quantizer import ResidualLFQuantizer
from .codec_streaming import UpstreamBatchDecode, CodecDecodeSession, StreamingStack, StepContext
from .configuration_moss_audio_tokenizer import COMPUTE_DTYPE_NAMES, PATCH_MODULE, MossAudioTokenizerConfig
from .devices import DTYPES_BY_NAME

# transformers 4.57.1 copies out of a local codec folder only the modules this file imports relatively (5.x follows
# imports transitively), so the module devices.py reaches is imported here as well. Remove with 4.57.
from .host import cpu_description  # noqa: F401,E402

logger = logging.getLogger(__name__)

# Offline attention: query blocks of about a quarter window, each against its (context - 1 + block) keys; groups of
# blocks are sized so one group's score tensor stays under this many bytes.
OFFLINE_SCORE_BUDGET_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Attention kernels: signature fn(module, query, key, value, mask, scaling), query [B, H, Tq, D], key/value
# [B, H, Tk, D], mask bool broadcastable to [B, 1, Tq, Tk] with True = attend (bool, so that the Ascend adapter's
# SDPA takes its fused kernel). Never a fully masked row.
# ----------------------------------------------------------------------------------------------------------------------
def eager_attention(module, query, key, value, mask, scaling):
    """Reference kernel: softmax in fp32. `mask` is bool, True = attend."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def sdpa_attention(module, query, key, value, mask, scaling):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


CODEC_ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}
# Upstream's flash path differs from SDPA by one key per window (codec.md §8 item 2); the exact windowed SDPA is used.
ATTENTION_ALIASES = {"flash_attention_2": "sdpa"}


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, context: int) -> torch.Tensor:
    """True where key <= query and query - key < context. query_pos [..., Tq], key_pos [..., Tk] -> [..., Tq, Tk]."""
    distance = query_pos[..., :, None] - key_pos[..., None, :]
    return (distance >= 0) & (distance < context)


def windowed_attention(module, query, key, value, context: int, kernel) -> torch.Tensor:
    """Causal sliding-window attention over a whole sequence, positions 0..T-1, without a dense T x T.

    Queries are cut into blocks; a block starting at s attends keys [s - context + 1, s + block), which holds every
    key its rows may see. The result equals the dense masked attention up to float summation order.
    Shapes: query/key/value [B, H, T, D] -> [B, H, T, D].
    """
    batch, heads, length, dim = query.shape
    scaling = dim**-0.5
    block = max(1, (context + 3) // 4)
    if length <= context + block:
        pos = torch.arange(length, device=query.device)
        return kernel(module, query, key, value, window_mask(pos, pos, context), scaling)
    blocks = -(-length // block)
    tail = blocks * block - length
    query = F.pad(query, (0, 0, 0, tail))
    key, value = (F.pad(t, (0, 0, context - 1, tail)) for t in (key, value))
    width = context - 1 + block
    group = max(1, OFFLINE_SCORE_BUDGET_BYTES // (batch * heads * block * width * 4))
    outputs = []
    for first in range(0, blocks, group):
        count = min(group, blocks - first)
        outputs.append(_attend_block_group(module, query, key, value, first, count, block, context, kernel))
    return torch.cat(outputs, dim=2)[:, :, :length]


def _attend_block_group(module, query, key, value, first, count, block, context, kernel):
    """Blocks first..first+count-1 of `windowed_attention` in one kernel call (key/value front-padded by context-1)."""
    batch, heads, _, dim = query.shape
    width = context - 1 + block
    start = first * block
    q = query[:, :, start : start + count * block].reshape(batch, heads, count, block, dim)
    # unfold gives [B, H, count, D, width]: one key window per block, windows overlapping by context - 1.
    k, v = (t[:, :, start : start + (count - 1) * block + width].unfold(2, width, block) for t in (key, value))
    q = q.transpose(1, 2).reshape(batch * count, heads, block, dim)
    k, v = (t.permute(0, 2, 1, 4, 3).reshape(batch * count, heads, width, dim) for t in (k, v))
    block_start = start + torch.arange(count, device=query.device)[:, None] * block
    query_pos = block_start + torch.arange(block, device=query.device)  # [count, block]
    key_pos = block_start - (context - 1) + torch.arange(width, device=query.device)  # [count, width]
    mask = window_mask(query_pos, key_pos, context) & (key_pos >= 0)[:, None, :]  # front padding is not a key
    mask = mask[:, None].repeat(batch, 1, 1, 1)  # [B * count, 1, block, width]
    out = kernel(module, q, k, v, mask, dim**-0.5)
    return out.reshape(batch, count, heads, block, dim).transpose(1, 2).reshape(batch, heads, count * block, dim)


# ----------------------------------------------------------------------------------------------------------------------
# RoPE: interleaved pairs (dims 2i, 2i+1), freq_i = max_period^(-2i/D), computed in fp32 (codec.md §2.5).
# ----------------------------------------------------------------------------------------------------------------------
def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for absolute positions [..., T]: cos [..., T, 1, 1, D] with each frequency repeated for its
    pair (2i, 2i+1), and sin signed (-sin, +sin) per pair. fp32; they broadcast over q and k [B, T, 2, H, D]."""
    half = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(half * (-math.log(max_period) * 2.0 / head_dim))
    angles = positions.to(torch.float32)[..., None, None, None] * freqs  # [..., T, 1, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, ..., D] in fp32 and cast back:
    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin). Real arithmetic only (portable)."""
    cos, signed_sin = rope
    x32 = x.to(torch.float32)
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x_2i+1, x_2i) per pair
    return (x32 * cos + swapped * signed_sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (attribute names = upstream state-dict keys).
# ----------------------------------------------------------------------------------------------------------------------
class PatchedPretransform(nn.Module):
    """Patch reshape. Down h: [B, T, d] -> [B, T/h, d*h] with channel c*h + j = time offset j. Up h is the inverse."""

    def __init__(self, patch_size: int, is_downsample: bool):
        super().__init__()
        self.patch_size = patch_size
        self.is_downsample = is_downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        h = self.patch_size
        if self.is_downsample:
            frames = length // h  # floor, as upstream lengths
            x = x[:, : frames * h].reshape(batch, frames, h, channels)
            return x.transpose(2, 3).reshape(batch, frames, channels * h)
        x = x.reshape(batch, length, channels // h, h)
        return x.transpose(2, 3).reshape(batch, length * h, channels // h)


class LayerScale(nn.Module):
    """Learned per-channel scale on a residual branch."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.scale = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def add_scaled(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + scale * x in one kernel."""
        return torch.addcmul(residual, x, self.scale)


class CodecSelfAttention(nn.Module):
    """Causal sliding-window self-attention; in_proj rows are [q | k | v], heads of contiguous dims, no biases."""

    def __init__(self, d_model: int, num_heads: int, context: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.context = context
        self.attention_backend = "sdpa"
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, rope, step: StepContext | None = None, layer: int | None = None) -> torch.Tensor:
        """x [B, T, D]; rope: `rope_tables` output; step: streaming (the ring KV cache of the stage's layer
        `layer`, required with it), else offline windowed."""
        batch, length, d_model = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)  # q and k rotated in one pass
        q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))  # [B, H, T, Dh]
        kernel = CODEC_ATTENTION_FUNCTIONS[self.attention_backend]
        if step is None:
            out = windowed_attention(self, q, k, v, self.context, kernel)
        else:
            keys, values = step.write(layer, k, v)
            out = kernel(self, q, keys, values, step.mask, self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model))


class CodecTransformerLayer(nn.Module):
    """Pre-norm layer: x + ls1 * Attn(LN1 x), then x + ls2 * FFN(LN2 x); FFN = Linear, exact GELU, Linear."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, context: int, layer_scale: float):
        super().__init__()
        self.self_attn = CodecSelfAttention(d_model, num_heads, context)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward, bias=False), nn.GELU(), nn.Linear(dim_feedforward, d_model, bias=False)
        )
        self.layer_scale_1 = LayerScale(d_model, layer_scale)
        self.layer_scale_2 = LayerScale(d_model, layer_scale)

    def forward(self, x, rope, step: StepContext | None = None, layer: int | None = None) -> torch.Tensor:
        x = self.layer_scale_1.add_scaled(x, self.self_attn(self.norm1(x), rope, step, layer))
        return self.layer_scale_2.add_scaled(x, self.ffn(self.norm2(x)))


class CodecTransformer(nn.Module):
    """Holds the layers (key prefix `transformer.layers.N`); no final norm."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(CodecTransformerLayer(**layer_kwargs) for _ in range(num_layers))


class ProjectedTransformer(nn.Module):
    """input_proj (no bias) -> causal transformer with RoPE -> output_proj (no bias), on [B, T, C] tensors."""

    def __init__(self, entry: dict, context: int):
        super().__init__()
        d_model, num_heads = entry["d_model"], entry["num_heads"]
        self.context = context
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.num_layers = entry["num_layers"]
        self.max_period = entry["max_period"]
        self.input_proj = nn.Linear(entry["input_dimension"], d_model, bias=False)
        self.transformer = CodecTransformer(
            entry["num_layers"],
            d_model=d_model,
            num_heads=num_heads,
            dim_feedforward=entry["dim_feedforward"],
            context=context,
            layer_scale=entry["layer_scale"],
        )
        self.output_proj = nn.Linear(d_model, entry["output_dimension"], bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_proj.weight.dtype

    def forward(self, x: torch.Tensor, step: StepContext | None = None) -> torch.Tensor:
        """x [B, T, C_in] -> [B, T, C_out]; `step` (streaming) supplies positions, ring slots, mask and caches."""
        x = self.input_proj(x.to(self.dtype))
        positions = torch.arange(x.shape[1], device=x.device) if step is None else step.positions
        rope = rope_tables(positions, self.head_dim, self.max_period)
        for index, layer in enumerate(self.transformer.layers):
            x = layer(x, rope, step, index)
        return self.output_proj(x)


def _check_transformer_entry(entry: dict) -> None:
    expected = {"causal": True, "gating": "none", "norm": "layer_norm", "positional_embedding": "rope"}
    for name, value in expected.items():
        if entry.get(name, value) != value:
            raise ValueError(f"transformer option {name}={entry.get(name)!r} is not supported; expected {value!r}")


def build_stack(entries: list[dict], rate: float, is_downsample: bool, default_duration: float) -> nn.ModuleList:
    """Patch layers and ProjectedTransformers of one stack; `rate` = token rate (Hz) entering the stack.

    Each transformer's window is round(stage token rate * context_duration) tokens (codec.md §2.5).
    """
    modules = []
    for entry in entries:
        if entry["module_type"] == PATCH_MODULE:
            modules.append(PatchedPretransform(entry["patch_size"], is_downsample))
            rate = rate / entry["patch_size"] if is_downsample else rate * entry["patch_size"]
            continue
        _check_transformer_entry(entry)
        context = int(round(rate * entry.get("context_duration", default_duration)))
        if context < 1:
            raise ValueError(f"context_duration={entry.get('context_duration')} gives a window of {context} tokens")
        modules.append(ProjectedTransformer(entry, context))
    return nn.ModuleList(modules)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs (upstream field names).
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MossAudioTokenizerEncoderOutput(ModelOutput):
    """audio_codes [nq, B, F] int64 (F = ceil(N / hop)); audio_codes_lengths [B] = floor(N / hop);
    encoder_hidden_states [B, code_dim, F] float32."""

    audio_codes: torch.LongTensor | None = None
    audio_codes_lengths: torch.LongTensor | None = None
    encoder_hidden_states: torch.FloatTensor | None = None


@dataclass
class MossAudioTokenizerDecoderOutput(ModelOutput):
    """audio [B, C, F * hop] float32; audio_lengths [B] int64 (valid samples per row)."""

    audio: torch.FloatTensor | None = None
    audio_lengths: torch.LongTensor | None = None


@dataclass
class MossAudioTokenizerOutput(ModelOutput):
    """forward(): decoded audio and lengths, plus the codes when audio was encoded."""

    audio: torch.FloatTensor | None = None
    audio_lengths: torch.LongTensor | None = None
    audio_codes: torch.LongTensor | None = None
    audio_codes_lengths: torch.LongTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------------------
class MossAudioTokenizerPreTrainedModel(PreTrainedModel):
    """Weight init and loading rules shared by the codec classes."""

    config_class = MossAudioTokenizerConfig
    base_model_prefix = "moss_audio_tokenizer"
    main_input_name = "input_values"
    _keep_in_fp32_modules = ["quantizer"]
    _keep_in_fp32_modules_strict = ["quantizer"]
    _no_split_modules = ["ProjectedTransformer", "ResidualLFQuantizer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights (only for keys missing from a checkpoint): normal(0, initializer_range) Linear/Embedding,
        LayerNorm 1/0, LayerScale at its configured value, weight-norm v normal with g = ||v||, zero conv biases."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LayerScale):
            nn.init.constant_(module.scale, module.init_value)
        elif isinstance(module, nn.Conv1d):
            nn.init.zeros_(module.bias)
            g, v = module.parametrizations.weight.original0, module.parametrizations.weight.original1
            if not getattr(v, "_is_hf_initialized", False):
                nn.init.normal_(v, mean=0.0, std=std)
                g.copy_(v.norm(dim=(1, 2), keepdim=True))


class MossAudioTokenizerModel(MossAudioTokenizerPreTrainedModel):
    """MOSS-Audio-Tokenizer-Nano: 48 kHz stereo <-> 16 x 1024 codes per 80 ms frame (12.5 Hz).

    Upstream API (codec.md §5): `encode`, `decode`, `batch_encode`, `batch_decode` (offline, and `streaming=True`
    with persistent rows), `_reset_batch_decode_streaming_state`, `forward`, `set_attention_implementation`,
    `set_compute_dtype`; attributes `sampling_rate`, `number_channels`, `downsample_rate`. Our streaming object:
    `decode_session(batch_size)` -> `CodecDecodeSession` with `step(codes [nq, B, T]) -> audio [B, C, T * hop]`.
    """

    def __init__(self, config: MossAudioTokenizerConfig):
        super().__init__(config)
        if config.number_channels > 1 and not config.enable_channel_interleave:
            raise ValueError("enable_channel_interleave=False with several channels is not supported; expected True")
        self.sampling_rate = config.sampling_rate
        self.number_channels = config.number_channels
        self.downsample_rate = config.downsample_rate
        stream_rate = config.sampling_rate * config.number_channels  # the interleaved stream
        duration = config.causal_transformer_context_duration
        self.encoder = build_stack(config.encoder_kwargs, stream_rate, True, duration)
        self.quantizer = ResidualLFQuantizer(**config.quantizer_kwargs)
        self.decoder = build_stack(config.decoder_kwargs, config.frame_rate, False, duration)
        self._check_hop()
        self._batch_streams: UpstreamBatchDecode | None = None
        self.set_attention_implementation(config.attention_implementation)
        self.post_init()

    def _check_hop(self) -> None:
        samples_per_frame = self.downsample_rate * self.number_channels
        for name, stack in (("encoder_kwargs", self.encoder), ("decoder_kwargs", self.decoder)):
            product = math.prod(m.patch_size for m in stack if isinstance(m, PatchedPretransform))
            if product != samples_per_frame:
                raise ValueError(f"{name} patch sizes multiply to {product}; expected {samples_per_frame} "
                                 "(downsample_rate * number_channels)")

    # -- settings ------------------------------------------------------------------------------------------------------
    def set_attention_implementation(self, name: str) -> None:
        """Attention kernel for every codec layer: "sdpa" or "eager"; "flash_attention_2" runs windowed SDPA."""
        backend = ATTENTION_ALIASES.get(name, name)
        if backend not in CODEC_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {name!r}; expected one of "
                             f"{sorted(CODEC_ATTENTION_FUNCTIONS) + sorted(ATTENTION_ALIASES)}")
        if backend != name:
            logger.info("codec attention %r runs the exact sliding-window %r path", name, backend)
        for module in self.modules():
            if isinstance(module, CodecSelfAttention):
                module.attention_backend = backend

    def set_compute_dtype(self, compute_dtype: str | torch.dtype) -> None:
        """Cast the encoder and decoder to "fp32", "bf16" or "fp16" (a torch dtype works too); the quantizer
        stays fp32. fp32 reproduces upstream; 16-bit is an optional speed/memory trade."""
        dtypes = {name: DTYPES_BY_NAME[name] for name in COMPUTE_DTYPE_NAMES}
        dtype = dtypes.get(compute_dtype, compute_dtype)
        if dtype not in dtypes.values():
            raise ValueError(f"compute_dtype={compute_dtype!r}; expected one of {list(COMPUTE_DTYPE_NAMES)}")
        self.encoder.to(dtype)
        self.decoder.to(dtype)

    # -- tensor helpers ------------------------------------------------------------------------------------------------
    def _interleave(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, C, N] -> the interleaved stream [B, N * C, 1] (L0 R0 L1 R1 ...)."""
        batch, channels, length = audio.shape
        return audio.transpose(1, 2).reshape(batch, length * channels, 1)

    def deinterleave(self, stream: torch.Tensor) -> torch.Tensor:
        """The decoder's stream [B, L * C, 1] -> audio [B, C, L]."""
        batch = stream.shape[0]
        return stream.reshape(batch, -1, self.number_channels).transpose(1, 2)

    def empty_audio(self, batch_size: int) -> torch.Tensor:
        """[B, C, 0] float32 audio on the model's device."""
        return torch.zeros(batch_size, self.number_channels, 0, device=self.quantizer.input_proj.bias.device)

    def _frames_per_chunk(self, chunk_duration: float | None) -> int | None:
        if chunk_duration is None:
            return None
        samples = chunk_duration * self.sampling_rate
        frames = int(round(samples / self.downsample_rate))
        if frames < 1 or abs(frames * self.downsample_rate - samples) > 1e-6 * self.sampling_rate:
            raise ValueError(f"chunk_duration={chunk_duration}; expected a positive multiple of "
                             f"{self.downsample_rate / self.sampling_rate} s")
        return frames


    def _device(self) -> torch.device:
        return self.quantizer.input_proj.bias.device

    def _num_quantizers(self, num_quantizers: int | None) -> int:
        total = self.config.num_quantizers
        if num_quantizers is None:
            return total
        if not 1 <= int(num_quantizers) <= total:
            raise ValueError(f"num_quantizers={num_quantizers}; expected 1..{total}")
        return int(num_quantizers)

    def _as_batch_audio(self, input_values: torch.Tensor) -> torch.Tensor:
        audio = input_values.unsqueeze(0) if input_values.dim() == 2 else input_values
        if audio.dim() != 3 or audio.shape[1] != self.number_channels:
            raise ValueError(f"input_values shape {tuple(input_values.shape)}; expected "
                             f"[B, {self.number_channels}, samples] or [{self.number_channels}, samples]")
        return audio.to(device=self._device(), dtype=torch.float32)

    # -- offline stacks ------------------------------------------------------------------------------------------------
    def _run_encoder(self, audio: torch.Tensor, chunk_frames: int | None) -> torch.Tensor:
        """audio [B, C, F * hop] -> encoder output [B, F, code_dim] (fp32); chunked through ring caches if asked."""
        stream = self._interleave(audio)
        if chunk_frames is None:
            for module in self.encoder:
                stream = module(stream)
            return stream.to(torch.float32)
        units = self.downsample_rate * self.number_channels
        state = StreamingStack(self.encoder, audio.shape[0], units, chunk_frames, self._device())
        pieces = [state.step(stream[:, start : start + chunk_frames * units])
                  for start in range(0, stream.shape[1], chunk_frames * units)]
        return torch.cat(pieces, dim=1).to(torch.float32)

    def _run_decoder(self, codes: torch.Tensor, chunk_frames: int | None) -> torch.Tensor:
        """codes [nq, B, F] -> audio [B, C, F * hop] (fp32); chunked through a decode session if asked."""
        if codes.shape[-1] == 0:
            return self.empty_audio(codes.shape[1])
        if chunk_frames is not None:
            return self.decode_session(codes.shape[1], chunk_frames).step(codes).to(torch.float32)
        stream = self.quantizer.decode(codes)
        for module in self.decoder:
            stream = module(stream)
        return self.deinterleave(stream).to(torch.float32)

    # -- upstream API --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, input_values, padding_mask=None, num_quantizers=None, return_dict=None, chunk_duration=None):
        """Encode audio to codes.

        Args:
            input_values: float [B, C, N] or [C, N] at `sampling_rate`.
            padding_mask: optional [B, N]; its row sums are the valid lengths.
            num_quantizers: codebooks to produce (default all).
            return_dict: False returns the tuple (audio_codes, audio_codes_lengths).
            chunk_duration: seconds, a multiple of one frame (0.08 s): encode chunk by chunk (same codes).
        Returns:
            MossAudioTokenizerEncoderOutput: audio_codes [nq, B, ceil(N / hop)] int64, audio_codes_lengths [B] =
            floor(valid / hop) (upstream's floor, codec.md §2.6), encoder_hidden_states [B, code_dim, F] fp32.
        """
        audio = self._as_batch_audio(input_values)
        batch, _, length = audio.shape
        hop = self.downsample_rate
        if padding_mask is None:
            lengths = torch.full((batch,), length, dtype=torch.long, device=audio.device)
        else:
            lengths = padding_mask.to(audio.device).long().sum(dim=-1)
        frames = -(-length // hop)
        audio = F.pad(audio, (0, frames * hop - length))
        hidden = self._run_encoder(audio, self._frames_per_chunk(chunk_duration))
        code_lengths = lengths // hop
        codes = self.quantizer.encode(hidden, code_lengths, self._num_quantizers(num_quantizers))
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return codes, code_lengths
        return MossAudioTokenizerEncoderOutput(codes, code_lengths, hidden.transpose(1, 2))

    @torch.no_grad()
    def decode(self, audio_codes, padding_mask=None, return_dict=None, chunk_duration=None, num_quantizers=None):
        """Decode codes to audio.

        Args:
            audio_codes: int [nq, B, F] or [nq, F].
            padding_mask: optional [B, F] frame mask; its row sums give `audio_lengths` (in frames).
            return_dict: False returns the tuple (audio,).
            chunk_duration: seconds, a multiple of 0.08: decode chunk by chunk through ring caches (same audio).
            num_quantizers: use only the first n codebooks of `audio_codes`.
        Returns:
            MossAudioTokenizerDecoderOutput: audio [B, C, F * hop] fp32, audio_lengths [B] int64.
        """
        codes = audio_codes.unsqueeze(1) if audio_codes.dim() == 2 else audio_codes
        if codes.dim() != 3:
            raise ValueError(f"audio_codes shape {tuple(audio_codes.shape)}; expected [nq, B, F] or [nq, F]")
        codes = self._select_codebooks(codes.to(self._device()).long(), num_quantizers)
        audio = self._run_decoder(codes, self._frames_per_chunk(chunk_duration))
        frames = codes.shape[-1]
        if padding_mask is None:
            audio_lengths = torch.full((codes.shape[1],), frames * self.downsample_rate, device=audio.device)
        else:
            audio_lengths = padding_mask.to(audio.device).long().sum(dim=-1) * self.downsample_rate
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (audio,)
        return MossAudioTokenizerDecoderOutput(audio, audio_lengths.long())

    def _select_codebooks(self, codes: torch.Tensor, num_quantizers: int | None) -> torch.Tensor:
        """The first nq codebooks of codes [nq_in, ...], checked against the codebook size (one host sync)."""
        nq = self._num_quantizers(codes.shape[0] if num_quantizers is None else num_quantizers)
        if codes.shape[0] < nq:
            raise ValueError(f"num_quantizers={nq} but the codes hold only {codes.shape[0]} codebooks")
        codes = codes[:nq]
        if codes.numel() and not bool(((codes >= 0) & (codes < self.config.codebook_size)).all()):
            raise ValueError(f"codes hold values outside 0..{self.config.codebook_size - 1} (e.g. the TTS pad "
                             "1024); expected codebook indices")
        return codes

    @torch.no_grad()
    def batch_encode(self, wav_list, num_quantizers=None, chunk_duration=None) -> MossAudioTokenizerEncoderOutput:
        """Encode a list of [C, N_i] waveforms (zero-padded into one batch). Returns the `encode` output."""
        if not wav_list:
            raise ValueError("wav_list is empty; expected at least one [channels, samples] tensor")
        for wav in wav_list:
            if wav.dim() != 2 or wav.shape[0] != self.number_channels:
                raise ValueError(f"waveform shape {tuple(wav.shape)}; expected [{self.number_channels}, samples]")
        longest = max(int(wav.shape[-1]) for wav in wav_list)
        audio = torch.stack([F.pad(wav.to(self._device(), torch.float32), (0, longest - wav.shape[-1]))
                             for wav in wav_list])
        lengths = torch.tensor([wav.shape[-1] for wav in wav_list], device=audio.device)
        padding_mask = torch.arange(longest, device=audio.device) < lengths[:, None]
        return self.encode(audio, padding_mask, num_quantizers, True, chunk_duration)

    @torch.no_grad()
    def batch_decode(self, codes_list, num_quantizers=None, chunk_duration=None, streaming=False,
                     max_batch_size=None, finalize_indices=None, reset_stream=False, **graph_options):
        """Decode a list of [nq, F_i] code tensors.

        Args:
            codes_list: one [nq, F_i] int tensor per row (F_i may be 0 when streaming).
            num_quantizers: use the first n codebooks.
            chunk_duration: offline only, as in `decode`.
            streaming: rows are persistent streams across calls (upstream semantics): `max_batch_size` fixes the
                slots on the first call, more rows in a later call are appended, `finalize_indices` rows are decoded
                then evicted, `reset_stream=True` starts over. Several frames per call are decoded in one pass.
            graph_options: upstream's device graph-capture flag; accepted and ignored here (devices.py owns graphs).
        Returns:
            MossAudioTokenizerDecoderOutput: audio [B, C, max F_i * hop] fp32, audio_lengths [B] = F_i * hop.
        """
        if any(graph_options.values()):
            logger.info("batch_decode options %s are ignored by this codec", sorted(graph_options))
        if not codes_list:
            raise ValueError("codes_list is empty; expected at least one [nq, frames] tensor")
        codes_list = [self._select_codebooks(c.to(self._device()).long(), num_quantizers) for c in codes_list]
        if len({c.shape[0] for c in codes_list}) != 1 or any(c.dim() != 2 for c in codes_list):
            raise ValueError(f"codes shapes {[tuple(c.shape) for c in codes_list]}; expected [nq, frames], equal nq")
        if streaming:
            return self._batch_decode_streaming(codes_list, max_batch_size, finalize_indices, reset_stream)
        frames = [c.shape[-1] for c in codes_list]
        codes = torch.stack([F.pad(c, (0, max(frames) - c.shape[-1])) for c in codes_list], dim=1)
        audio = self._run_decoder(codes, self._frames_per_chunk(chunk_duration))
        lengths = torch.tensor(frames, dtype=torch.long, device=audio.device) * self.downsample_rate
        return MossAudioTokenizerDecoderOutput(audio, lengths)

    def _batch_decode_streaming(self, codes_list, max_batch_size, finalize_indices, reset_stream):
        if reset_stream or self._batch_streams is None:
            slots = max_batch_size or len(codes_list)
            self._batch_streams = UpstreamBatchDecode(self.decode_session(slots))
        audio, lengths = self._batch_streams.decode(codes_list, finalize_indices)
        return MossAudioTokenizerDecoderOutput(audio.to(torch.float32), lengths)

    def _reset_batch_decode_streaming_state(self) -> None:
        """Close the streams of `batch_decode(streaming=True)` (their caches are freed)."""
        self._batch_streams = None

    def decode_session(self, batch_size: int = 1, max_frames_per_step: int = 8) -> CodecDecodeSession:
        """A streaming decoder over preallocated ring KV caches (memory flat for any length).

        Args:
            batch_size: independent streams (rows).
            max_frames_per_step: frames decoded per pass; longer steps are split. Sets the ring capacity
                (window + this many frames of tokens - 1 per stage).
        Returns:
            CodecDecodeSession with `step(codes [nq, B, T], num_frames=None) -> audio [B, C, T * hop]`,
            `reset(rows=None)` and `frames_decoded` [B].
        """
        return CodecDecodeSession(self, batch_size, max_frames_per_step)

    def forward(self, input_values=None, padding_mask=None, audio_codes=None, num_quantizers=None,
                return_dict=None):
        """Encode `input_values` if given, then decode the given or produced codes."""
        codes = code_lengths = None
        if input_values is not None:
            codes, code_lengths = self.encode(input_values, padding_mask, num_quantizers, return_dict=False)
        if audio_codes is None:
            audio_codes = codes
        if audio_codes is None:
            raise ValueError("forward needs input_values or audio_codes; got neither")
        decoded = self.decode(audio_codes, num_quantizers=num_quantizers, return_dict=True)
        output = MossAudioTokenizerOutput(decoded.audio, decoded.audio_lengths, codes, code_lengths)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


__all__ = [
    "MossAudioTokenizerModel",
    "MossAudioTokenizerPreTrainedModel",
    "MossAudioTokenizerEncoderOutput",
    "MossAudioTokenizerDecoderOutput",
    "MossAudioTokenizerOutput",
]
