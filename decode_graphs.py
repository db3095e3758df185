"""Opt-in fixed-shape decode steps for `MossTTSNanoForCausalLM.enable_fast_decode`: eager, torch.compile or graphs.

Why: one generated frame runs one global step (n_layer layers) and 17 local steps of one layer each (slots
0..n_vq). On NPU and CUDA these small serial steps are bound by kernel launches, not arithmetic. Capturing a step as
a device graph (or compiling it) removes most of the launch cost. Capture needs steps whose shapes and control flow
never change, so this module runs both decode steps in a *static* form:

* each runner owns its KV buffers at full capacity (local: n_vq + 1; global: prompt + frames rounded up to
  CAPACITY_BUCKET), one tensor per layer, written in place at a position tensor (long [1]);
* attention reads the full capacity with a bool key mask (local: `slot <= position`; global: the sequence mask,
  plus the diagonal): masked keys get exactly zero weight, so stale entries are never seen and nothing is reset;
* RoPE (or the learned wpe) and position ids come from tensors, not host ints;
* inputs and outputs live in preallocated buffers; sampling, the heads and the stop check stay outside (random ops
  cannot be captured, npu.md §1.6). The prefill (first global step) runs the default path into the runner's cache.

Numerics (fp32, CPU, tests/test_decode_accelerators.py): the static steps differ from the default ones by a few
ulp (local hidden within 5e-7; text logits within ~4e-6 of ~8), because softmax and weights·V reduce over a longer
key axis whose extra keys have weight exactly 0; greedy and seeded-sampled codes are identical on the tiny models.

Modes:
    "none": the default path (nothing here runs).
    "static": the fixed-shape step, eager (for checks; no speed-up expected).
    "compile": `torch.compile(static step, fullgraph=True, dynamic=False)` per runner, with the backend that
        `devices.compile_backend` names (inductor; npugraph_ex or npu on NPU); any compile failure (e.g.
        the int8/bf16 packed Linear of weight_formats.py) logs one line and falls back to the eager static step.
        On CPU it brings no measurable gain (fp32 32.3 vs 32.6 ms/frame, full size, 2 threads); compiling costs
        ~10 s per runner there. Dynamo's recompile limit applies: many distinct batch sizes fall back to eager.
    "graph": device graph capture of the static step through `devices.capture_graph` (CUDAGraph, NPUGraph).
        Where graphs are unsupported (CPU, old Ascend adapters) it logs one line and uses the default path.
        UNTESTED ON HARDWARE: this project had no CUDA or NPU machine; only the CPU fallback is tested.

Only devices.py knows device types; this module asks it whether graphs exist and how to capture them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from . import devices
from .gpt2_decoder import attention_function

logger = logging.getLogger(__name__)

FAST_DECODE_MODES = ("none", "static", "compile", "graph")
# The global runner's cache capacity is prompt + frames rounded up to this, so one compile/capture serves many calls.
CAPACITY_BUCKET = 256


class LayerCache:
    """A KVCache (same `update`/`advance`/`reset`/`length`) whose layers are separate tensors [B, H, capacity, D].

    Why separate: torch.compile updates a graph input in place, but an update of one layer's *view* of a shared
    [L, ...] buffer was compiled as a copy of the whole layer buffer every step (2x slower global step on CPU).

    Args:
        decoder: the MossTTSNanoGPT2Model it serves (layers, heads, head size, dtype, device).
        batch_size, capacity: buffer shape.
    """

    def __init__(self, decoder, batch_size: int, capacity: int) -> None:
        weight = decoder.ln_f.weight
        shape = (batch_size, decoder.num_heads, capacity, decoder.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in decoder.h]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in decoder.h]
        self.capacity = capacity
        self.length = 0

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As KVCache.update: write [B, H, T, D] at [length, length + T); views up to the new end."""
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions needed, capacity is {self.capacity}")
        self.keys[layer_idx][:, :, self.length:end].copy_(key)
        self.values[layer_idx][:, :, self.length:end].copy_(value)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def reset(self) -> None:
        self.length = 0


class _SlotCache:
    """Duck-types `KVCache.update/advance` for the static step: writes at a position tensor, reads full capacity.

    Args:
        cache: the preallocated per-layer buffers, [B, H, capacity, D] each.
        position: long [1], the slot being written.
    """

    def __init__(self, cache: LayerCache, position: torch.Tensor) -> None:
        self.keys, self.values, self.position = cache.keys, cache.values, position

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value [B, H, 1, D] -> the layer's full buffers [B, H, capacity, D] (in place, no allocation)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.position] = key  # index_put_ on the layer's own tensor: in place, also when compiled
        values[:, :, self.position] = value
        return keys, values

    def advance(self, num_positions: int) -> None:
        """Nothing to do: the position is set by the caller before every step."""


class _StepRunner:
    """Shared plumbing: turn the eager `_step` (inputs in buffers -> output buffer) into the mode's callable."""

    position: torch.Tensor

    def _step(self) -> None:
        raise NotImplementedError

    def _build(self, mode: str) -> Callable[[], None]:
        if mode == "static":
            return self._step
        if mode == "compile":
            backend = devices.compile_backend(self.position.device)
            return self._first_compiled_call(torch.compile(self._step, backend=backend, fullgraph=True, dynamic=False))
        try:
            replay = devices.capture_graph(self.position.device, self._step)
        except Exception as error:  # capture errors are backend-specific (CUDA, aclgraph); any of them means eager
            reason = (str(error).splitlines() or [""])[0]
            logger.warning("graph capture of the %s failed (%s: %s); using the eager static step",
                           type(self).__name__, type(error).__name__, reason)
            return self._step
        if replay is None:  # FastDecode.create checks graph_supported first; this is a safety net
            logger.warning("graph capture unavailable on %s; using the eager static step", self.position.device)
            return self._step
        return replay

    def _first_compiled_call(self, compiled: Callable[[], None]) -> Callable[[], None]:
        """Run the first call guarded: a compile failure logs one line and switches to the eager step for good."""

        def run() -> None:
            try:
                compiled()
            except Exception as error:  # dynamo/inductor raise many types; any of them means "run eager"
                reason = (str(error).splitlines() or [""])[0]  # one log line, not dynamo's multi-line report
                logger.warning("torch.compile of the %s failed (%s: %s); using the eager step",
                               type(self).__name__, type(error).__name__, reason)
                self._run = self._step
                self._step()  # idempotent: the step rewrites the same cache position
                return
            self._run = compiled

        return run


class LocalStepRunner(_StepRunner):
    """One fixed-shape local-decoder step for a given batch size, attention backend, dtype and device.

    Call it as `runner(slot_input [B, C], slot) -> hidden [B, C]`. The returned tensor is the runner's output
    buffer: read it before the next call.

    Args:
        model: the MossTTSNanoForCausalLM.
        batch_size: B.
        attention: a key of gpt2_decoder.ATTENTION_FUNCTIONS.
        mode: "static", "compile" or "graph" (graph must be supported on the model's device).
    """

    def __init__(self, model, batch_size: int, attention: str, mode: str) -> None:
        local = model.local_transformer
        weight = local.ln_f.weight
        capacity = model.config.n_vq + 1
        self.local = local
        self.attention = attention_function(attention)
        self.position = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.slots = torch.arange(capacity, device=weight.device)
        self.cache = _SlotCache(LayerCache(local, batch_size, capacity), self.position)
        self.inputs = torch.zeros(batch_size, 1, weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.output = torch.zeros(batch_size, weight.shape[0], dtype=weight.dtype, device=weight.device)
        # RoPE tables of every slot, [1, 1, capacity, D]; the step gathers one column by the position tensor.
        self.rope = local.rotary_emb(self.slots, weight.dtype) if local.rotary_emb is not None else None
        self._run = self._build(mode)

    def _step(self) -> None:
        """The captured work: inputs + position -> output (no host sync, no data-dependent Python branch)."""
        position = self.position
        mask = (self.slots <= position).view(1, 1, 1, -1)  # [1, 1, 1, capacity], True = attend
        hidden = self.inputs
        rope = None
        if self.rope is not None:  # fixed per model, not per step
            rope = (self.rope[0].index_select(2, position), self.rope[1].index_select(2, position))
        else:
            hidden = hidden + self.local.wpe.weight.index_select(0, position)
        hidden = self.local.step(hidden, self.cache, rope, mask, self.attention)
        self.output.copy_(hidden[:, -1])

    def __call__(self, slot_input: torch.Tensor, slot: int) -> torch.Tensor:
        """slot_input [B, C] at local position `slot` -> hidden [B, C] after ln_f (the output buffer)."""
        self.inputs[:, 0].copy_(slot_input)
        self.position.fill_(slot)
        self._run()
        return self.output


class GlobalStepRunner(_StepRunner):
    """One fixed-shape global-decoder step (one new row per sequence) over a cache of fixed capacity.

    The runner owns its cache (`cache`, a LayerCache that the default prefill fills) and a key-mask buffer, so
    the captured graph (or compiled code) sees the same memory on every generate call of the same bucket. Masked
    keys (pad, stopped rows, positions not yet written) get exactly zero weight; a masked query keeps its diagonal
    and its outputs are zeroed, as in `MossTTSNanoGPT2Model.forward` (spec §4.3-4.4).

    Args:
        model: the MossTTSNanoForCausalLM.
        batch_size: B.
        attention: a key of gpt2_decoder.ATTENTION_FUNCTIONS.
        capacity: cache positions (prompt + frames, rounded up to CAPACITY_BUCKET so compiles are reused).
        mode: "static", "compile" or "graph".
    """

    def __init__(self, model, batch_size: int, attention: str, capacity: int, mode: str) -> None:
        decoder = model.transformer
        weight = decoder.ln_f.weight
        self.decoder = decoder
        self.attention = attention_function(attention)
        self.cache = LayerCache(decoder, batch_size, capacity)
        self.position = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.slot_cache = _SlotCache(self.cache, self.position)
        self.key_mask = torch.zeros(batch_size, capacity, dtype=torch.bool, device=weight.device)
        self.key_positions = torch.arange(capacity, device=weight.device)
        self.inputs = torch.zeros(batch_size, 1, weight.shape[0], dtype=weight.dtype, device=weight.device)
        local_dtype = model.local_transformer.ln_f.weight.dtype
        self.output = torch.zeros(batch_size, weight.shape[0], dtype=local_dtype, device=weight.device)
        self._run = self._build(mode)

    def bind(self) -> LayerCache:
        """Start a generate call: empty cache and key mask. Returns the cache for the prefill to fill."""
        self.cache.reset()
        self.key_mask.zero_()
        return self.cache

    def _step(self) -> None:
        """inputs [B, 1, C] at `position` -> output [B, C] (same ops as MossTTSNanoGPT2Model.forward for T = 1)."""
        decoder, position, key_mask = self.decoder, self.position, self.key_mask
        query_valid = key_mask.index_select(1, position)  # [B, 1]
        # Position ids as in position_ids_from_mask: cumsum(mask) - 1 at the query, 0 for a masked query.
        position_ids = (key_mask.long().cumsum(-1) - 1).index_select(1, position).masked_fill(~query_valid, 0)
        mask = (key_mask | (self.key_positions == position))[:, None, None, :]  # [B, 1, 1, capacity]
        hidden = self.inputs
        keep = query_valid[..., None].to(hidden.dtype)  # [B, 1, 1]
        rope = None
        if decoder.rotary_emb is not None:  # fixed per model, not per step
            rope = decoder.rotary_emb(position_ids, hidden.dtype)
        else:
            hidden = hidden + decoder.wpe(position_ids)
        hidden = decoder.drop(hidden) * keep
        for block in decoder.h:
            hidden = block(hidden, mask, rope, self.slot_cache, self.attention) * keep
        hidden = decoder.ln_f(hidden) * keep
        self.output.copy_(hidden[:, -1])  # cast to the local decoder's dtype, as _global_hidden does

    def __call__(self, row_embedding: torch.Tensor, sequence_mask: torch.Tensor, length: int) -> torch.Tensor:
        """The step for the row at index length - 1.

        Args:
            row_embedding: [B, 1, C], the appended row's embedding.
            sequence_mask: bool [B, >= length], the generate call's mask (True = real row).
            length: rows so far, including the appended one.

        Returns:
            [B, C] in the local decoder's dtype (the output buffer: read it before the next call).
        """
        assert self.cache.length == length - 1, "the global cache must hold every row before the new one"
        self.key_mask[:, :length].copy_(sequence_mask[:, :length])
        self.inputs.copy_(row_embedding)
        self.position.fill_(length - 1)
        self._run()
        self.cache.advance(1)
        return self.output


class FastDecode:
    """The model's fast-decode setting: a mode plus the runners built so far (one per batch/backend/weights).

    Args:
        mode: one of FAST_DECODE_MODES other than "none".
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._runners: dict[tuple, _StepRunner] = {}

    @classmethod
    def create(cls, mode: str, device: torch.device) -> "FastDecode | None":
        """The setting for `mode` on `device`, or None for the default path ("none", or graphs unsupported).

        Raises:
            ValueError: for a mode not in FAST_DECODE_MODES.
        """
        if mode not in FAST_DECODE_MODES:
            raise ValueError(f"fast decode mode {mode!r} is not one of {FAST_DECODE_MODES}")
        if mode == "graph" and not devices.graph_supported(device):
            logger.warning("graph capture is not supported on %s; using the default decode path", device)
            return None
        return None if mode == "none" else cls(mode)

    def attach(self, model, state, attention: tuple[str, str]) -> None:
        """Give a generate call's state its runners: `fast_local`, `fast_global`, and the global runner's cache.

        Runners are reused by later calls with the same batch size, backends, capacity bucket and weights, so
        compiling or capturing happens once per such key. Two generate streams of one model must not be
        interleaved while fast decode is on (they would share these buffers).

        Args:
            model: the MossTTSNanoForCausalLM.
            state: its _GenerationState (KV-cache path), before the prefill.
            attention: the resolved (global, local) backend names.
        """
        batch, capacity = state.mask.shape
        capacity = -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
        state.fast_local = self._runner(model, LocalStepRunner, batch, attention[1])
        state.fast_global = self._runner(model, GlobalStepRunner, batch, attention[0], capacity)
        state.global_cache = state.fast_global.bind()

    def _runner(self, model, runner_class, *args) -> _StepRunner:
        """The runner of this class for `args`, built (and compiled or captured) on first use.

        The key holds the weights' device, dtype and address, so moving or casting the model builds a new one.
        """
        weight = model.transformer.ln_f.weight
        key = (runner_class, *args, weight.device, weight.dtype, weight.data_ptr())
        if key not in self._runners:
            self._runners[key] = runner_class(model, *args, self.mode)
        return self._runners[key]


__all__ = ["CAPACITY_BUCKET", "FAST_DECODE_MODES", "FastDecode", "GlobalStepRunner", "LocalStepRunner"]
