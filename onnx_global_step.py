"""The global step of an int8 frame as one ONNX Runtime call (CPU).

Each frame starts with one step of the 12-layer global decoder for every row: the row fed last frame goes in, its
keys and values are written to the decoder's KV cache, and the hidden state after ln_f comes out for the text
decision, which takes it through the local decoder's step 0 and the text head. In torch that is about 40 small
calls per layer around 4 int8 matrix products. This module writes the 12 blocks and local step 0 as one ONNX graph
over the same int8 values (onnx_graph.py) and runs it in one call per frame, 1.4-1.9x faster than torch on a 2-vCPU
AMD EPYC (one row, 150 cached positions, global blocks only: 8.0-10.8 ms against 15.0-17.6 ms). Local step 0 runs at
position 0 of a fresh cache, where it needs no attention kernel (`GraphBuilder.first_position`); its keys and values
go to the local cache as `lockstep_step` writes them, for the audio phase.

The graph works on the SlotDecoder's own KV cache, in place: each layer's keys and values [slots, H, capacity, D]
are bound as both the past and the present of ONNX Runtime's `GroupQueryAttention` (a shared buffer, no copy). That
operator reads row n's keys 0..positions[n] and writes its new key at positions[n], which is the decode step's
arithmetic wherever a row's real keys are exactly positions 0..positions[n] - 1: true of every slot of a SlotDecoder
(each prompt is prefilled alone from position 0, and a row that stops never advances). The operator also rotates
the new query and key at positions[n] (RoPE, from the decoder's own frequencies); rows that are not real (`valid`
False) come out as zeros and leave their key masked, as in `MossTTSNanoGPT2Model.decode_step`, whose bookkeeping
(`KVCache.advance`) runs after the graph.

Hidden states match the torch step up to the float rounding of another int8 kernel (cosine 0.9999 or closer at the
released size), which the int8 format's bounds already allow (tests/test_onnx_global_step.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .gpt2_decoder import KVCache, attention_function
from .onnx_graph import (GraphBuilder, GraphPhase, best_times, new_session, phase_graph, register,
                         rope_frequencies)


class GlobalStepGraph:
    """The int8 global decoder's decode step in one ONNX Runtime session.

    Args:
        model: a MossTTSNanoForCausalLM in the int8 format, on the CPU.
        threads: ONNX Runtime's intra-op threads (default: torch's).
    """

    def __init__(self, model, threads: int | None = None) -> None:
        self.decoder = model.transformer
        self.layers = len(self.decoder.h)
        self.local_layers = len(model.local_transformer.h)
        self.session = new_session(_GlobalStepBuilder(self.decoder, model.local_transformer).build, threads)
        self._bound = (None, {})  # the cache last run on, and its bindings by row count

    def run(self, inputs_embeds: torch.Tensor, valid: torch.Tensor | None, cache: KVCache, read_length=None,
            attention=None) -> torch.Tensor:
        """`decode_step` for the first N slots, called as it is: hidden [N, C] after ln_f (the operator reads each
        row's own length, and it is the attention: `read_length` and `attention` are not needed)."""
        return self.step(inputs_embeds, valid, cache)[0]

    def step(self, inputs_embeds: torch.Tensor, valid: torch.Tensor | None, cache: KVCache,
             local_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global step of the first N slots and the local decoder's step 0 on its output: (global hidden, local
        hidden), each [N, C] after its ln_f; the local step's keys and values go to position 0 of `local_cache`'s
        first N slots, where given (what `lockstep_step` at position 0 writes).

        Args:
            inputs_embeds: float32 [N, 1, C].
            valid: bool [N], or None when every row is real.
            cache: the decoder's KVCache, every slot holding real keys at positions 0..positions - 1 only (true of a
                SlotDecoder's slots: module docstring).
        """
        rows, width = inputs_embeds.shape[0], inputs_embeds.shape[-1]
        positions = cache.positions[:rows]
        last = int(positions.max())
        if last >= cache.capacity:  # the operator would write past the buffer; torch's scatter raises here too
            raise ValueError(f"KV cache overflow: position {last} written, capacity is {cache.capacity}")
        block = self.decoder.h[0].attn
        inputs = {"hidden": inputs_embeds.reshape(rows, width).contiguous(),
                  "keep": torch.ones(rows, 1) if valid is None else valid[:, None].float(),
                  "seqlens": positions.to(torch.int32), "total": torch.tensor(last + 1, dtype=torch.int32)}
        outputs = {"hidden_out": torch.empty(rows, width), "local_out": torch.empty(rows, width)}
        for layer in range(self.local_layers):
            for part in ("key", "value"):
                outputs[f"local_{part}_{layer}"] = torch.empty(rows, block.num_heads, 1, width // block.num_heads)
        binding = self._binding(cache, rows)
        for name, tensor in inputs.items():
            _bind(binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            _bind(binding.bind_output, name, tensor)
        with torch.profiler.record_function(GLOBAL_STEP.span):
            self.session.run_with_iobinding(binding)
        cache.advance(rows, valid)
        if local_cache is not None:
            for layer in range(self.local_layers):
                local_cache.keys[layer][:rows, :, :1] = outputs[f"local_key_{layer}"]
                local_cache.values[layer][:rows, :, :1] = outputs[f"local_value_{layer}"]
        return outputs["hidden_out"], outputs["local_out"]

    def _binding(self, cache: KVCache, rows: int):
        """The session's binding of `cache`'s first `rows` slots, past and present in the same memory (the cache is
        written in place), and of the RoPE tables: made once per cache and row count (24 binds cost ~0.5 ms)."""
        bound_cache, bindings = self._bound
        if bound_cache is not cache:
            bindings = {}
            self._bound = cache, bindings
        if rows not in bindings:
            binding = self.session.io_binding()
            cos, sin = rope_frequencies(self.decoder.rotary_emb, cache.capacity)
            _bind(binding.bind_input, "rope_cos", cos)
            _bind(binding.bind_input, "rope_sin", sin)
            for layer in range(self.layers):
                for kind, tensors in (("key", cache.keys), ("value", cache.values)):
                    _bind(binding.bind_input, f"past_{kind}_{layer}", tensors[layer][:rows])
                    _bind(binding.bind_output, f"present_{kind}_{layer}", tensors[layer][:rows])
            bindings[rows] = binding, (cos, sin)  # the tables stay alive while they are bound
        return bindings[rows][0]


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    """Bind a contiguous CPU tensor's memory (no copy) to the session's input or output `name`."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu", name
    dtype = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}[tensor.dtype]
    bind(name, "cpu", 0, dtype, list(tensor.shape), tensor.data_ptr())


class _GlobalStepBuilder(GraphBuilder):
    """Writes the graph: each block with GroupQueryAttention (RoPE included) on the bound cache, then ln_f; rows
    that are not real are zeroed after each stage, as the torch step does."""

    def __init__(self, decoder, local) -> None:
        if decoder.rotary_emb is None or local.rotary_emb is None:
            raise ValueError("the ONNX global step expects decoders with RoPE (position_embedding_type 'rope')")
        shape = (local.ln_f.weight.shape, local.h[0].attn.num_heads)
        if shape != (decoder.ln_f.weight.shape, decoder.h[0].attn.num_heads):
            raise ValueError("the ONNX global step expects a local decoder of the global decoder's width and heads")
        super().__init__(decoder.h[0])
        self.decoder, self.local = decoder, local

    def build(self):
        hidden = self.op("Mul", ["hidden", "keep"])
        poison = self.poison(hidden)  # a row fed NaN or inf comes out NaN, as from the torch step
        for layer, block in enumerate(self.decoder.h):
            hidden = self.op("Mul", [self.block(hidden, block, self._attention(layer, block)), "keep"])
        hidden = self.op("Mul", [self.op("Add", [self.layer_norm(hidden, self.decoder.ln_f), poison]), "keep"])
        self.output(hidden, "hidden_out")
        for layer, block in enumerate(self.local.h):  # local step 0 (the text decision's), on every row
            hidden, key, value = self.first_position(hidden, block)
            self.output(key, f"local_key_{layer}")
            self.output(value, f"local_value_{layer}")
        self.output(self.layer_norm(hidden, self.local.ln_f), "local_out")
        return self.finish("moss_tts_nano_global_step", *self._signature())

    def _attention(self, layer: int, block):
        def attend(qkv: str) -> str:
            cache = [f"{kind}_{part}_{layer}" for kind in ("past", "present") for part in ("key", "value")]
            return self.attention(qkv, cache[:2], cache[2:], ("seqlens", "total"), ("rope_cos", "rope_sin"),
                                  float(block.attn.scaling))
        return attend

    def _signature(self) -> tuple[list[tuple], list[tuple]]:
        types = self.onnx.TensorProto
        float_, width, heads, dim = types.FLOAT, self.width, self.heads, self.head_dim
        cache = [(f"{kind}_{part}_{layer}", float_, ["N", heads, "capacity", dim])
                 for layer in range(len(self.decoder.h)) for part in ("key", "value") for kind in ("past", "present")]
        inputs = [("hidden", float_, ["N", width]), ("keep", float_, ["N", 1]), ("seqlens", types.INT32, ["N"]),
                  ("total", types.INT32, []), ("rope_cos", float_, [None, dim // 2]),
                  ("rope_sin", float_, [None, dim // 2])]
        inputs += [spec for spec in cache if spec[0].startswith("past")]
        outputs = [("hidden_out", float_, ["N", width]), ("local_out", float_, ["N", width])]
        outputs += [(f"local_{part}_{layer}", float_, ["N", heads, 1, dim]) for layer in range(len(self.local.h))
                    for part in ("key", "value")]
        outputs += [spec for spec in cache if spec[0].startswith("present")]
        return inputs, outputs


def _probe(model, graph: GlobalStepGraph, length: int = 96) -> dict[str, float]:
    """One row's global step both ways at `length` cached positions, best seconds of each."""
    decoder = model.transformer
    cache = KVCache.for_decoder(decoder, 1, length + 1)
    cache.key_mask[:, :length] = True
    embeds = torch.zeros(1, 1, decoder.ln_f.weight.shape[0])
    attention = attention_function("sdpa")

    def torch_step() -> None:
        cache.positions.fill_(length)
        decoder.decode_step(embeds, None, cache, length + 1, attention)

    def onnx_step() -> None:
        cache.positions.fill_(length)
        graph.run(embeds, None, cache)

    return best_times({"torch": torch_step, "onnxruntime": onnx_step})


# The global step as a graph phase of the int8 format (onnx_graph.py: the per-CPU decision, set_phase, phases_of).
GLOBAL_STEP = register(GraphPhase("global_step", GlobalStepGraph, _probe))


def global_step_graph(model) -> GlobalStepGraph | None:
    """The model's global step graph where the probe kept it on this CPU, else None (onnx_graph.phase_graph)."""
    return phase_graph(model, GLOBAL_STEP)


__all__ = ["GLOBAL_STEP", "GlobalStepGraph", "global_step_graph"]
