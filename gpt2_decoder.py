"""The GPT-2-style decoder of MOSS-TTS-Nano: pre-LN blocks, interleaved RoPE, one attention table, preallocated caches.

Both the global decoder (over audio frames) and the local decoder (over the 1 + n_vq slots of one frame) are a
`MossTTSNanoGPT2Model`. Parameter names equal the checkpoint keys (`h.N.attn.c_attn`, `h.N.mlp.fc_in`, `ln_f`, ...;
spec tts.md §2), all Linear layers are `nn.Linear` ([out, in] weights, not GPT-2's Conv1D).

Numerics follow the upstream `gpt2_decoder.py` (spec §4):
* RoPE pairs *adjacent* elements (2i, 2i+1) (GPT-J style), not rotate-half; angles in float32, then cast (§4.2);
* position ids come from the attention mask: cumsum(mask) - 1, pad positions 0 (§4.3);
* hidden states are multiplied by the query mask after the embedding, after every block and after ln_f (§4.4);
* eager attention scales q·kᵀ, fills masked scores with finfo.min and takes the softmax in the compute dtype (§4.5).

Attention backends share one signature, `fn(module, query, key, value, mask, scaling) -> [B, H, Tq, D]`, with
query [B, H, Tq, D], key/value [B, H, Tk, D] and a bool mask broadcastable to [B, 1, Tq, Tk] (True = attend, never a
fully False row). The table maps backend names to functions; the device kernels live in `devices.py`, the only file
that knows device types. Which backend runs is a run-time argument, resolved by the caller through
`devices.resolve_attention`.

One cache class, `KVCache`: preallocated keys/values with a slot dimension, a per-slot position tensor and a per-slot
key mask, so that the decode step (`MossTTSNanoGPT2Model.decode_step`) has fixed shapes and runs eagerly, compiled or
captured alike (STYLE.md rules 11-13). The global decoder's cache holds a slot per stream; the local decoder uses the
same class with capacity n_vq + 1, reset every frame. The caller owns the cache and passes it in.

Three entry points share one block stack (`_run_blocks`): `forward` (whole sequences, HF style, optionally appending
to a cache), `prefill` (one prompt into one slot, or its rest after a stored prefix, `KVCache.write_prefix`) and
`decode_step` (one position for each of N slots).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from .devices import flash_attention as device_flash_attention
from .devices import npu_fusion_attention as device_npu_fusion_attention

logger = logging.getLogger(__name__)

AttentionFunction = Callable[..., torch.Tensor]
# Activations replaced by a fused kernel of the same function (one op per call instead of several; see the MLP).
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


# ----------------------------------------------------------------------------------------------------------------
# Attention backends


def eager_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Reference attention (upstream's eager path): scaled scores, finfo.min fill, softmax in the compute dtype.

    Args:
        module: the calling attention module (unused; part of the common signature).
        query: [B, H, Tq, D]; key, value: [B, H, Tk, D].
        mask: bool, broadcastable to [B, 1, Tq, Tk], True = attend; None = attend everywhere.
        scaling: multiplier of q·kᵀ.

    Returns:
        [B, H, Tq, D].
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value)


def sdpa_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """`torch.nn.functional.scaled_dot_product_attention` with an explicit bool mask (fused on NPU and CUDA)."""
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def flash_attention_2(module, query, key, value, mask, scaling) -> torch.Tensor:
    """The device's flash kernel (CUDA flash_attn), through `devices.flash_attention`."""
    return device_flash_attention(module, query, key, value, mask, scaling)


def npu_fusion_attention(module, query, key, value, mask, scaling) -> torch.Tensor:
    """Ascend's fused kernel, through `devices.npu_fusion_attention`."""
    return device_npu_fusion_attention(module, query, key, value, mask, scaling)


# The one attention table, keyed by backend name (the values of `devices.resolve_attention`).
ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention_2,
    "npu_fusion_attention": npu_fusion_attention,
}


def attention_function(name: str) -> AttentionFunction:
    """The table entry for `name`.

    Raises:
        ValueError: for a name that is not a key of ATTENTION_FUNCTIONS.
    """
    if name not in ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {sorted(ATTENTION_FUNCTIONS)}")
    return ATTENTION_FUNCTIONS[name]


# ----------------------------------------------------------------------------------------------------------------
# Masks and positions


def position_ids_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last `query_length` positions: cumsum(mask) - 1, 0 at masked positions (spec §4.3).

    Args:
        attention_mask: bool [B, P + T], the full mask (past + new).
        query_length: T.

    Returns:
        long [B, T]. With left padding, real tokens start at position 0.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(~attention_mask, 0)
    return positions[:, -query_length:]


def build_attention_mask(key_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Causal AND key-padding mask, with the diagonal always open so that no row is fully masked.

    Args:
        key_mask: bool [B, P + T], the full mask (past + new).
        query_length: T; query i sits at key position P + i.

    Returns:
        bool [B, 1, T, P + T], True = attend. Pad queries see at least themselves (their outputs are zeroed later).
    """
    total = key_mask.shape[-1]
    key_positions = torch.arange(total, device=key_mask.device)
    query_positions = key_positions[total - query_length:, None]  # [T, 1]
    causal = key_positions[None, :] <= query_positions  # [T, P + T]
    diagonal = key_positions[None, :] == query_positions
    return (key_mask[:, None, None, :] & causal) | diagonal


# ----------------------------------------------------------------------------------------------------------------
# Interleaved rotary embedding


class MossTTSNanoGPT2RotaryEmbedding(nn.Module):
    """Interleaved-pair (GPT-J) RoPE tables for one head size (spec §4.2).

    `inv_freq[i] = 1 / base^(2i/d)` in float32. It is a plain cached tensor per device, not a buffer, so it is never
    part of the state_dict and never left uninitialised by meta-device loading.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """float32 [dim / 2] on `device` (computed once per device)."""
        if device not in self._inv_freq:
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            self._inv_freq[device] = (1.0 / (self.base**exponents)).to(device)
        return self._inv_freq[device]

    def table(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of positions 0..length-1, each [length, dim] in `dtype` (built once, grown by doubling).

        The decode step gathers its rows' positions from it: two ops per step instead of recomputing the angles.
        """
        key = (dtype, device)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * cached[0].shape[0] if cached is not None else 64)
            cos, sin = self(torch.arange(size, device=device), dtype)
            cached = self._tables[key] = (cos[0, 0], sin[0, 0])
        return cached

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [N, 1, 1, dim] for one position per row, positions [N] < `limit`."""
        cos, sin = self.table(limit, dtype, positions.device)
        return cos.index_select(0, positions)[:, None, None], sin.index_select(0, positions)[:, None, None]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for `position_ids` [B, T] (or [T]), each [B, 1, T, dim] (or [1, 1, T, dim]) in `dtype`.

        Each frequency is repeated twice, adjacently ([f0, f0, f1, f1, ...]), to match the interleaved pairs. The
        sin table carries the rotation's signs, [-sin f0, +sin f0, -sin f1, ...], so that `apply_rotary` needs no
        negation per call (negating is exact, so the result is bit-identical to x·cos + rotate_every_two(x)·sin).
        """
        angles = position_ids.float()[..., None] * self.inv_freq(position_ids.device)  # [B, T, dim / 2]
        cos = angles.cos().repeat_interleave(2, dim=-1).to(dtype)
        sin = angles.sin()
        sin = torch.stack((-sin, sin), dim=-1).flatten(-2).to(dtype)
        if cos.dim() == 2:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dimension (reference form of the rotation)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = x[2i+1]·cos + x[2i]·sin. x: [..., T, D].

    Args:
        x: queries and/or keys, e.g. [B, H, T, D] or [2, B, H, T, D] (both at once).
        cos, signed_sin: the tables of `MossTTSNanoGPT2RotaryEmbedding` (sin with the signs -, +, -, +, ...).

    Swapping each pair (x1, x0, x3, x2, ...) with one `flip` and multiplying by the signed sin gives the same
    products as upstream's rotate-every-two (x·(-s) == -(x·s) exactly), in 4 ops instead of 9.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * signed_sin


# ----------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """The one KV cache: preallocated keys and values of every layer of one decoder, for a number of independent slots.

    Per layer, keys and values are [slots, H, capacity, D] (a tensor per layer, so that an in-place write of one
    layer never looks like a write of the others to torch.compile). Per slot, `positions` [slots] (long) is the next
    write index and `key_mask` [slots, capacity] (bool) says which written positions hold real keys (False: never
    written, left padding, or a row appended after its sequence finished). Both are tensors, so a decode step reads
    and advances them on the device: its shapes never change, and it runs eagerly, compiled or captured in a graph.

    Two ways to write (both return a `CacheWrite` that the attention layers call):
    * `sequence_write(rows, start, length)`: a run of positions for some rows (prefill, and `forward`, whose callers
      keep `length` = the positions written by the sequence API);
    * `step_write(num_rows, read_length)`: one position per row at `positions[:num_rows]` (the decode step).

    Args:
        num_layers, num_slots, num_heads, capacity, head_dim: buffer shape.
        dtype, device: of the buffers (the decoder's compute dtype and device).
    """

    def __init__(
        self, num_layers: int, num_slots: int, num_heads: int, capacity: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (num_slots, num_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask = torch.zeros(num_slots, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.capacity = capacity
        self.length = 0  # positions written through `sequence_write` for all rows at once (the forward API)
        self._causal = None  # causal_mask(), built on first use

    @classmethod
    def for_decoder(
        cls, decoder: "MossTTSNanoGPT2Model", num_slots: int, capacity: int, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "KVCache":
        """A cache shaped for `decoder` (dtype and device default to its parameters')."""
        weight = decoder.ln_f.weight
        return cls(
            len(decoder.h), num_slots, decoder.num_heads, capacity, decoder.head_dim,
            dtype or weight.dtype, device or weight.device,
        )

    @property
    def num_slots(self) -> int:
        return self.key_mask.shape[0]

    def reset(self, rows: slice = slice(None)) -> None:
        """Forget the keys of `rows`: positions and key mask only (cheap enough for every frame of the local decoder).

        Masked entries get exactly zero attention weight, but their values still enter `weights @ values`, where a
        stale non-finite value gives 0 x NaN = NaN: when another owner may have written the rows, use `clear`.
        """
        self.positions[rows] = 0
        self.key_mask[rows] = False
        if rows == slice(None):
            self.length = 0

    def clear(self, rows: slice = slice(None)) -> None:
        """`reset`, and zero the keys and values of `rows` (a slot's new owner then reads only its own writes and
        exact zeros, whatever the previous owner left there: a stale NaN or inf can no longer reach its output)."""
        self.reset(rows)
        for tensor in self.keys + self.values:
            tensor[rows].zero_()

    def sequence_write(self, rows: slice, start: int, length: int, key_mask: torch.Tensor | None = None
                       ) -> "CacheWrite":
        """Positions [start, start + length) of `rows`; they become real keys where `key_mask` [N, length] says so
        (default: all). Reads back positions [0, start + length).

        Raises:
            ValueError: when the cache would overflow its capacity.
        """
        end = start + length
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions needed, capacity is {self.capacity}")
        self.key_mask[rows, start:end] = True if key_mask is None else key_mask
        self.positions[rows] = end
        return CacheWrite(self, rows, start, end)

    def prefix(self, slot: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of positions [0, length) of slot `slot`, per layer [H, length, D] (views)."""
        return ([keys[slot, :, :length] for keys in self.keys], [values[slot, :, :length] for values in self.values])

    def write_prefix(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Make `keys` and `values` (per layer [H, P, D], from `prefix`) the real keys [0, P) of slot `slot`; the
        slot's other keys are forgotten (`reset`)."""
        rows, length = slice(slot, slot + 1), keys[0].shape[1]
        self.reset(rows)
        for source, target in ((keys, self.keys), (values, self.values)):
            for layer, tensor in enumerate(source):
                target[layer][slot, :, :length].copy_(tensor)
        self.key_mask[rows, :length] = True
        self.positions[rows] = length

    def causal_mask(self) -> torch.Tensor:
        """bool [capacity, 1, 1, 1, capacity], row p open on keys 0..p (built once per cache): the mask of a lockstep
        step at position p, read over the whole capacity (unwritten keys closed). Each row is 4-D: CPU SDPA rounds a
        3-D mask's result differently from the [N, 1, 1, T] mask of `decode_step`, a 4-D one identically."""
        if self._causal is None:
            positions = torch.arange(self.capacity, device=self.key_mask.device)
            self._causal = (positions[None, :] <= positions[:, None])[:, None, None, None, :]
        return self._causal

    def step_write(self, num_rows: int, read_length: int) -> "CacheWrite":
        """One position per row of slots [0, num_rows), at `positions[:num_rows]`; reads [0, read_length)."""
        return CacheWrite(self, slice(0, num_rows), self.positions[:num_rows], read_length)

    def advance(self, num_rows: int, valid: torch.Tensor | None) -> None:
        """After a decode step wrote one key per row of slots [0, num_rows) at `positions`: those keys become real
        where `valid` (bool [N]; None: every row) says so, and those rows move on by one position."""
        index = self.positions[:num_rows]
        self.key_mask[:num_rows].scatter_(1, index[:, None], True if valid is None else valid[:, None])
        self.positions[:num_rows] += 1 if valid is None else valid

    def grow(self, capacity: int) -> "KVCache":
        """A copy of this cache with room for `capacity` positions (used by `forward` when an HF-style caller keeps
        appending past the capacity; decoding never grows a cache)."""
        first = self.keys[0]
        bigger = KVCache(len(self.keys), self.num_slots, first.shape[1], capacity, first.shape[3], first.dtype,
                         first.device)
        kept = min(capacity, self.capacity)
        for source, target in ((self.keys, bigger.keys), (self.values, bigger.values)):
            for layer, tensor in enumerate(source):
                target[layer][:, :, :kept].copy_(tensor[:, :, :kept])
        bigger.key_mask[:, :kept].copy_(self.key_mask[:, :kept])
        bigger.positions.copy_(self.positions)
        bigger.length = self.length
        return bigger

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Upstream's format of what `forward` wrote: per layer (key, value), each [B, T, H, D] (views)."""
        end = self.length
        return tuple((keys[:, :, :end].transpose(1, 2), values[:, :, :end].transpose(1, 2))
                     for keys, values in zip(self.keys, self.values))

    @classmethod
    def from_legacy(cls, past: tuple, capacity: int | None = None) -> "KVCache":
        """A cache holding upstream-format `past` (per layer (key, value) [B, T, H, D]) with room up to `capacity`."""
        key0 = past[0][0]
        batch, length, heads, head_dim = key0.shape
        cache = cls(len(past), batch, heads, max(capacity or length, length), head_dim, key0.dtype, key0.device)
        for layer, (key, value) in enumerate(past):
            cache.keys[layer][:, :, :length].copy_(key.transpose(1, 2))
            cache.values[layer][:, :, :length].copy_(value.transpose(1, 2))
        cache.key_mask[:, :length] = True
        cache.positions.fill_(length)
        cache.length = length
        return cache


class CacheWrite:
    """Where one decoder call writes its new keys and values, and how much of the cache it reads back.

    Args:
        cache: the KVCache.
        rows: the slots of this call (a slice, so every access is a view, never a copy).
        index: an int (a run of positions starting there, the same for every row) or a long tensor [N] (one
            position per row: the decode step).
        read_length: keys and values [0, read_length) are returned to the attention.
    """

    def __init__(self, cache: KVCache, rows: slice, index: int | torch.Tensor, read_length: int) -> None:
        self.cache, self.rows, self.index, self.read_length = cache, rows, index, read_length
        self._scatter_index = None

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value [N, H, T, D] of layer `layer`; return its keys and values [N, H, read_length, D] (views)."""
        keys, values = self.cache.keys[layer][self.rows], self.cache.values[layer][self.rows]
        if isinstance(self.index, int):
            end = self.index + key.shape[2]
            keys[:, :, self.index:end].copy_(key)
            values[:, :, self.index:end].copy_(value)
        else:
            if self._scatter_index is None:  # [N, H, 1, D], built once per call and shared by the layers
                self._scatter_index = self.index.view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])
            keys.scatter_(2, self._scatter_index, key)
            values.scatter_(2, self._scatter_index, value)
        return keys[:, :, : self.read_length], values[:, :, : self.read_length]


# ----------------------------------------------------------------------------------------------------------------
# Modules


class MossTTSNanoGPT2Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection (`c_attn`) and RoPE on q and k."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layer_idx = layer_idx
        scaling = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scaling /= float(layer_idx + 1)
        self.scaling = scaling
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: CacheWrite | None, attention: AttentionFunction,
    ) -> torch.Tensor:
        """hidden [B, T, C] -> [B, T, C]; keys/values are written through `cache` (post-RoPE) when given."""
        batch, length, _ = hidden.shape
        qkv = self.c_attn(hidden).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        value = qkv[2]  # [B, H, T, D]
        query_key = qkv[:2] if rope is None else apply_rotary(qkv[:2], *rope)  # [2, B, H, T, D], one rotation
        query, key = query_key[0], query_key[1]
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)
        output = attention(self, query, key, value, mask, self.scaling)  # [B, H, T, D]
        output = output.transpose(1, 2).reshape(batch, length, -1)
        output = self.c_proj(output)
        return self.resid_dropout(output) if self.training else output


class MossTTSNanoGPT2MLP(nn.Module):
    """fc_in -> activation (gelu_new) -> fc_out."""

    def __init__(self, config) -> None:
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.fc_in = nn.Linear(config.n_embd, inner)
        self.fc_out = nn.Linear(inner, config.n_embd)
        # "gelu_new" (upstream's tanh GELU written as 8 elementwise ops) runs as torch's fused tanh GELU: the same
        # function, one kernel; values differ by at most 1 ulp (about 2e-7) and greedy codes are unchanged.
        self.act = ACT2FN[FUSED_ACTIVATIONS.get(config.activation_function, config.activation_function)]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.fc_out(self.act(self.fc_in(hidden)))
        return self.dropout(hidden) if self.training else hidden


class MossTTSNanoGPT2Block(nn.Module):
    """Pre-LN residual block: h + attn(ln_1(h)), then h + mlp(ln_2(h)) (spec §4.1)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MossTTSNanoGPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MossTTSNanoGPT2MLP(config)

    def forward(self, hidden, mask, rope, cache, attention) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), mask, rope, cache, attention)
        return hidden + self.mlp(self.ln_2(hidden))


class MossTTSNanoGPT2Model(nn.Module):
    """A stack of pre-LN blocks over given input embeddings, with RoPE (or a learned wpe) and a final ln_f.

    Args:
        config: a GPT2Config (with the custom keys `position_embedding_type` and `rope_base`).
        token_embedding: whether `wte` is an Embedding (global decoder) or an Identity (local decoder, whose inputs
            are already embeddings; the Identity has no parameters, so no `local_transformer.wte.weight` key).
    """

    def __init__(self, config, token_embedding: bool = True) -> None:
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.position_embedding_type = getattr(config, "position_embedding_type", "rope")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd) if token_embedding else nn.Identity()
        use_wpe = self.position_embedding_type == "absolute"
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if use_wpe else nn.Identity()
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(MossTTSNanoGPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.rotary_emb = None
        if self.position_embedding_type == "rope":
            self.rotary_emb = MossTTSNanoGPT2RotaryEmbedding(self.head_dim, getattr(config, "rope_base", 10000.0))

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
        attention: str | AttentionFunction = "eager", position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the stack over whole sequences (the forward API; HF style).

        Args:
            inputs_embeds: [B, T, C].
            attention_mask: bool [B, P + T], the FULL mask (P = `cache.length` positions already cached); None = all
                valid.
            cache: a KVCache with one slot per row, extended at position P, or None (no past).
            attention: a key of ATTENTION_FUNCTIONS (or the function itself).
            position_ids: long [B, T] or [T]; default from the mask (spec §4.3).
            output_hidden_states: also return the input of every block plus the final output.

        Returns:
            (hidden [B, T, C] after ln_f with pad positions exactly 0, tuple of hidden states or None).
        """
        batch, length, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = attention_mask.bool()
        if attention_mask.shape[-1] != past + length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {past + length}"
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, length)
        write = None
        if cache is not None:
            write = cache.sequence_write(slice(None), past, length, attention_mask[:, past:])
            cache.length += length
        return self._run_blocks(
            inputs_embeds, attention_mask[:, -length:, None], build_attention_mask(attention_mask, length),
            position_ids, write, _as_function(attention), output_hidden_states,
        )

    def prefill(self, inputs_embeds: torch.Tensor, cache: KVCache, slot: int, attention: AttentionFunction,
                start: int = 0) -> torch.Tensor:
        """Write one sequence of real rows into slot `slot` of `cache` at positions [start, start + T).

        Args:
            inputs_embeds: [1, T, C], every row real.
            start: 0 resets the slot first; else the slot holds real keys at [0, start) (a stored prefix,
                `KVCache.write_prefix`) and the rows attend to them.

        Returns:
            hidden [1, T, C] after ln_f.
        """
        length = inputs_embeds.shape[1]
        rows = slice(slot, slot + 1)
        if start == 0:
            cache.reset(rows)
        write = cache.sequence_write(rows, start, length)
        positions = torch.arange(start, start + length, device=inputs_embeds.device)
        valid = torch.ones(1, start + length, dtype=torch.bool, device=inputs_embeds.device)
        hidden, _ = self._run_blocks(inputs_embeds, None, build_attention_mask(valid, length), positions, write,
                                     attention, False)
        return hidden

    def decode_step(
        self, inputs_embeds: torch.Tensor, valid: torch.Tensor | None, cache: KVCache, read_length: int,
        attention: AttentionFunction,
    ) -> torch.Tensor:
        """One new position for each of the first N slots of `cache`: the fixed-shape decode step.

        Row n writes its key at `cache.positions[n]` and attends to the real keys of its slot among positions
        [0, read_length) plus itself; its position (RoPE) is its write index. The shapes depend only on N and
        read_length, there is no host sync and no branch on data, so the same step runs eagerly, compiled or
        captured. Rows whose `valid` is False (a finished sequence, an empty slot) write a masked key, do not
        advance, and come out as zeros (spec §4.4).

        Args:
            inputs_embeds: [N, 1, C].
            valid: bool [N], or None when every row is real (no output masking: fewer ops).
            cache: the decoder's KVCache (slots >= N untouched).
            read_length: > every written position of the N slots.
            attention: the resolved attention function.

        Returns:
            hidden [N, C] after ln_f.
        """
        rows = inputs_embeds.shape[0]
        write = cache.step_write(rows, read_length)
        index = write.index  # [N]
        key_positions = torch.arange(read_length, device=index.device)
        visible = cache.key_mask[:rows, :read_length] | (key_positions == index[:, None])  # own key always open
        rope = None
        if self.rotary_emb is not None:
            rope = self.rotary_emb.lookup(index, inputs_embeds.dtype, cache.capacity)
        query_mask = None if valid is None else valid[:, None, None]
        hidden, _ = self._run_blocks(inputs_embeds, query_mask, visible[:, None, None, :], index[:, None], write,
                                     attention, False, rope)
        cache.advance(rows, valid)
        return hidden[:, 0]

    def lockstep_step(self, inputs_embeds: torch.Tensor, cache: KVCache, position: int, attention: AttentionFunction
                      ) -> torch.Tensor:
        """One new position, the same `position` for each of the first N slots (the local decoder's step: its cache
        is reset every frame and all rows step together, every row real).

        The same arithmetic as `decode_step` at that position (the same keys, mask values and RoPE rows), with fewer
        ops: keys and values are copied into one column instead of scattered, the mask is a row of a causal table
        and RoPE a row of the cached table, all views. `cache.positions` and `cache.key_mask` are not used.

        Args:
            inputs_embeds: [N, 1, C], every row real.
            position: the write index of every row, < cache.capacity.

        Returns:
            hidden [N, C] after ln_f.
        """
        rows, capacity = inputs_embeds.shape[0], cache.capacity
        if not 0 <= position < capacity:
            raise ValueError(f"lockstep position {position}; expected 0..{capacity - 1} (the cache's capacity)")
        write = CacheWrite(cache, slice(0, rows), position, capacity)
        visible = cache.causal_mask()[position]  # [1, 1, 1, capacity]: keys 0..position
        rope, position_ids = None, None
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb.table(capacity, inputs_embeds.dtype, inputs_embeds.device)
            rope = (cos[position:position + 1], sin[position:position + 1])  # [1, D], broadcast over rows and heads
        else:
            position_ids = torch.full((rows, 1), position, dtype=torch.long, device=inputs_embeds.device)
        hidden, _ = self._run_blocks(inputs_embeds, None, visible, position_ids, write, attention, False, rope)
        return hidden[:, 0]

    def _run_blocks(self, hidden, query_mask, mask, position_ids, write, attention, output_hidden_states, rope=None):
        """Embeddings -> blocks -> ln_f; with a query mask [B, T, 1], pad positions are zeroed after each stage.

        `rope` (cos, sin) may be given precomputed for `position_ids` (the decode step looks them up in a table).
        """
        keep = None if query_mask is None else query_mask.to(hidden.dtype)
        if self.rotary_emb is None:
            hidden = hidden + self.wpe(position_ids)
        elif rope is None:
            rope = self.rotary_emb(position_ids, hidden.dtype)
        if self.training:
            hidden = self.drop(hidden)
        hidden = _masked(hidden, keep)
        all_hidden = () if output_hidden_states else None
        for block in self.h:
            if all_hidden is not None:
                all_hidden += (hidden,)
            hidden = _masked(block(hidden, mask, rope, write, attention), keep)
        hidden = _masked(self.ln_f(hidden), keep)
        if all_hidden is not None:
            all_hidden += (hidden,)
        return hidden, all_hidden


def _masked(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return hidden if keep is None else hidden * keep


def _as_function(attention: str | AttentionFunction) -> AttentionFunction:
    return attention_function(attention) if isinstance(attention, str) else attention


__all__ = [
    "ATTENTION_FUNCTIONS",
    "CacheWrite",
    "KVCache",
    "MossTTSNanoGPT2Attention",
    "MossTTSNanoGPT2Block",
    "MossTTSNanoGPT2MLP",
    "MossTTSNanoGPT2Model",
    "MossTTSNanoGPT2RotaryEmbedding",
    "apply_rotary",
    "attention_function",
    "build_attention_mask",
    "eager_attention",
    "position_ids_from_mask",
    "sdpa_attention",
]
