"""The audio phase of an int8 frame as one ONNX Runtime call (CPU).

After a frame's text decision, the local decoder takes 16 steps, one per audio channel: its one block, the channel's
head, the pick of a code (repetition penalty, top-k, top-p, the sampling draw) and that code's embedding, which feeds
the next step. In torch each step is about 40 small calls around 5 int8 matrix products, and on a CPU the calls cost
as much as the products. This module writes the 16 steps, unrolled, as one ONNX graph over the same int8 weights
(`Int8DynamicLinear.int8_weight`; its products quantise activations per row, onnx_graph.py), and runs it in one
`InferenceSession.run` per frame.

What stays outside: the decision phase (the global step and local step 0 have their own graph, onnx_global_step.py;
the text head and decision run in torch), the random numbers (drawn in upstream's order before the phase) and the
bookkeeping after it. What the graph takes: the row embedding
of the decided text token, local step 0's key and value, the noise, the repetition history and the rows' settings;
what it gives: the 16 codes of each row, each channel's logit sum (the non-finite check) and the next row embedding,
summed in torch's order.

It is a kernel choice of the int8 format, like fp32's (onnx_graph.py): `audio_phase_graph(model)` builds it once per
model and keeps it only where a timing probe against the torch phase finds it faster (remembered per CPU). Its logits
are the torch phase's up to the rounding of 8-bit activations, and its picks are the torch phase's wherever both
kernels compute the same logits (tests/test_onnx_audio_phase.py); a sampled pick at a near-tie can go the other way
(the int8 format promises bounds, not codes); fp32, bf16 and fp16 never use it. Without onnxruntime (or onnx)
installed the int8 format runs in torch, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gpt2_decoder import KVCache, attention_function
from .onnx_graph import (GraphBuilder, GraphPhase, best_times, new_session, phase_graph, register,
                         rope_frequencies)


@dataclass
class PhaseInputs:
    """One frame's audio phase for N rows (every tensor float32 unless named, all on the CPU).

    row_embedding [N, C]: wte(decided text token), the first slot's input and the start of the next row's sum.
    key0, value0 [N, H, 1, D]: local step 0's key and value. noise [16, N, V]: exponential draws (any values where no
    row samples). seen bool [N, 16, V]: codes generated earlier. nq_mask [16, N, 1]: 1.0 where channel c < the row's
    nq, else 0.0. temperature, penalty, top_p [N, 1]; kth long [N, 1] (top-k - 1); top_p_on bool [N, 1]; do_sample
    bool [N]. top_k: the rows' largest top-k (>= 1).
    """

    row_embedding: torch.Tensor
    key0: torch.Tensor
    value0: torch.Tensor
    noise: torch.Tensor
    seen: torch.Tensor
    nq_mask: torch.Tensor
    temperature: torch.Tensor
    penalty: torch.Tensor
    top_p: torch.Tensor
    kth: torch.Tensor
    top_p_on: torch.Tensor
    do_sample: torch.Tensor
    top_k: int


class AudioPhaseGraph:
    """The 16 local steps of an int8 model's frame in one ONNX Runtime session.

    Args:
        model: a MossTTSNanoForCausalLM in the int8 format, on the CPU.
        threads: ONNX Runtime's intra-op threads (default: torch's).
    """

    def __init__(self, model, threads: int | None = None) -> None:
        self.channels = len(model.audio_lm_heads)
        self.session = new_session(_AudioPhaseBuilder(model).build, threads)
        # The embedding tables go in as inputs: numpy views of the model's own float32 weights, read without a copy.
        self.tables = {f"embedding_{channel}": embedding.weight.detach().numpy()
                       for channel, embedding in enumerate(model.audio_embeddings)}

    def run(self, inputs: PhaseInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes long [N, 16], logit sums float32 [N, 16], next row embedding [N, C])."""
        feeds = {name: _array(getattr(inputs, name)) for name in _TENSOR_INPUTS}
        feeds["top_k"] = np.array([inputs.top_k], dtype=np.int64)
        feeds.update(self.tables)
        with torch.profiler.record_function(AUDIO_PHASE.span):
            codes, sums, row = self.session.run(["codes", "logit_sums", "next_row"], feeds)
        return torch.from_numpy(codes), torch.from_numpy(sums), torch.from_numpy(row)


_TENSOR_INPUTS = ("row_embedding", "key0", "value0", "noise", "seen", "nq_mask", "temperature", "penalty", "top_p",
                  "kth", "top_p_on", "do_sample")


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


class _AudioPhaseBuilder(GraphBuilder):
    """Writes the unrolled graph: one local step, head and pick per channel, sharing the block's weights."""

    def __init__(self, model) -> None:
        local = model.local_transformer
        self.block_module, self.final_norm, self.rope = local.h[0], local.ln_f, local.rotary_emb
        if len(local.h) != 1 or self.rope is None:
            raise ValueError(f"the ONNX audio phase expects a one-layer local decoder with RoPE, got "
                             f"{len(local.h)} layers, rope={self.rope is not None}")
        super().__init__(self.block_module)
        self.model = model
        self.channels = len(model.audio_lm_heads)

    def build(self):
        """The ModelProto: inputs as `PhaseInputs` names them, plus each channel's embedding table (fed from the
        model's own tensors, so the graph holds no copy of them)."""
        self._shared_constants()
        codes, sums, row = self._channels()
        for name, parts in (("codes", codes), ("logit_sums", sums)):
            self.nodes.append(self.onnx.helper.make_node("Concat", parts, [name], axis=1))
        self.output(row, "next_row")
        return self.finish("moss_tts_nano_audio_phase", *self._signature())

    def _channels(self) -> tuple[list[str], list[str], str]:
        """Per channel: local step, head, logit sum, pick, embedding; returns (codes, sums, next row)."""
        cache = ["key0", "value0"]
        slot_input, row, codes, sums = "row_embedding", "row_embedding", [], []
        poison = self.poison("row_embedding", "key0", "value0")  # such a row's sums come out NaN: it fails alone
        for channel in range(self.channels):
            hidden = self.local_step(slot_input, channel + 1, cache)
            logits = self.linear(hidden, self.model.audio_lm_heads[channel])
            sums.append(self.op("Add", [self.op("ReduceSum", [logits, "axis_last"], keepdims=1), poison]))
            code = self.pick(logits, channel)
            codes.append(self.op("Unsqueeze", [code, "axis_last"]))
            embedded = self.op("Gather", [f"embedding_{channel}", code], axis=0)
            mask = self.op("Gather", ["nq_mask", self.constant(f"channel_{channel}", np.array(channel))], axis=0)
            slot_input = self.op("Mul", [embedded, mask])  # a row whose nq stops before c adds exact zeros
            row = self.op("Add", [row, slot_input])
        return codes, sums, row

    def _signature(self) -> tuple[list[tuple], list[tuple]]:
        types = self.onnx.TensorProto
        float_, long_, bool_ = types.FLOAT, types.INT64, types.BOOL
        width, heads, dim, channels = self.width, self.heads, self.head_dim, self.channels
        vocab = self.model.audio_lm_heads[0].out_features
        inputs = [("row_embedding", float_, ["N", width]), ("key0", float_, ["N", heads, 1, dim]),
                  ("value0", float_, ["N", heads, 1, dim]), ("noise", float_, [channels, "N", vocab]),
                  ("seen", bool_, ["N", channels, vocab]), ("nq_mask", float_, [channels, "N", 1]),
                  ("temperature", float_, ["N", 1]), ("penalty", float_, ["N", 1]), ("top_p", float_, ["N", 1]),
                  ("kth", long_, ["N", 1]), ("top_p_on", bool_, ["N", 1]), ("do_sample", bool_, ["N"]),
                  ("top_k", long_, [1])]
        inputs += [(f"embedding_{channel}", float_, [None, width]) for channel in range(channels)]
        outputs = [("codes", long_, ["N", channels]), ("logit_sums", float_, ["N", channels]),
                   ("next_row", float_, ["N", width])]
        return inputs, outputs

    def _shared_constants(self) -> None:
        self.scale = float(self.block_module.attn.scaling)
        self.constant("minus_inf", np.array(-np.inf, dtype=np.float32))
        vocab = self.model.audio_lm_heads[0].out_features
        self.constant("columns_all", np.arange(vocab, dtype=np.int64))
        self.columns = self.op("Slice", ["columns_all", "zero", "top_k"])  # [K]: 0..K-1
        for name, table in zip(("rope_cos", "rope_sin"), rope_frequencies(self.rope, self.channels + 1)):
            self.constant(name, table.numpy())
        self.batch = self.op("Slice", [self.op("Shape", ["row_embedding"]), "zero", "one"])  # [N]

    def local_step(self, hidden: str, position: int, cache: list[str]) -> str:
        """The local block at `position` (keys 0..position, all real), then ln_f; `cache` (the keys and values so
        far) becomes the keys and values through this step."""

        def attend(qkv: str) -> str:
            past = self.op("Expand", [self.constant(f"past_{position}", np.array([position], dtype=np.int32)),
                                      self.batch])
            total = self.constant(f"total_{position}", np.array(position + 1, dtype=np.int32))
            present = [f"local_key_{position}", f"local_value_{position}"]
            mixed = self.attention(qkv, cache, present, (past, total), ("rope_cos", "rope_sin"), self.scale)
            cache[:] = present
            return mixed

        return self.layer_norm(self.block(hidden, self.block_module, attend), self.final_norm)

    def pick(self, logits: str, channel: int) -> str:
        """Channel `channel`'s code of each row [N] (long): sampling.sample_rows on the top-k candidates."""
        index = self.constant(f"pick_{channel}", np.array(channel))
        seen = self.op("Gather", ["seen", index], axis=1)
        penalised = self.op("Where", [self.op("Less", [logits, "zero_float"]), self.op("Mul", [logits, "penalty"]),
                                      self.op("Div", [logits, "penalty"])])
        logits = self.op("Where", [seen, penalised, logits])  # a penalty of 1.0 changes nothing, bit for bit
        greedy = self.op("ArgMax", [logits], axis=-1, keepdims=0)
        candidates, indices = self.op("TopK", [logits, "top_k"], outputs=2, axis=-1, largest=1, sorted=1)
        candidates = self.op("Div", [candidates, "temperature"])
        beyond = self.op("Greater", [self.columns, "kth"])  # rows with a smaller top-k drop the columns past it
        candidates = self.op("Where", [beyond, "minus_inf", candidates])
        candidates = self.nucleus(candidates)
        noise = self.op("GatherElements", [self.op("Gather", ["noise", index], axis=0), indices], axis=1)
        best = self.op("ArgMax", [self.op("Div", [self.op("Softmax", [candidates], axis=-1), noise])], axis=-1,
                       keepdims=1)
        sampled = self.op("Squeeze", [self.op("GatherElements", [indices, best], axis=1), "axis_last"])
        return self.op("Where", ["do_sample", sampled, greedy])

    def nucleus(self, candidates: str) -> str:
        """Drop the candidates after the cumulative probability first exceeds top_p (the crossing one stays), in
        rows where top_p_on: candidate j goes where the probabilities before it (an exclusive running sum, the same
        additions as the inclusive one's column j - 1) exceed top_p, so the best candidate (a sum of 0) always stays."""
        before = self.op("CumSum", [self.op("Softmax", [candidates], axis=-1), "axis_last"], exclusive=1)
        over = self.op("And", [self.op("Greater", [before, "top_p"]), "top_p_on"])
        return self.op("Where", [over, "minus_inf", candidates])


def _probe(model, graph: AudioPhaseGraph) -> dict[str, float]:
    """One row's audio phase both ways (greedy picks: the same work for both), best seconds of each."""
    torch_phase, onnx_phase = _probe_runs(model, graph)
    return best_times({"torch": torch_phase, "onnxruntime": onnx_phase})


def _probe_runs(model, graph: AudioPhaseGraph):
    """Two closures running one row's 16 local steps, heads and greedy picks: in torch, and through the graph."""
    local, channels = model.local_transformer, graph.channels
    cache = KVCache.for_decoder(local, 1, channels + 1)
    attention = attention_function("sdpa")
    width, vocab = local.ln_f.weight.shape[0], model.audio_lm_heads[0].out_features
    start = torch.zeros(1, 1, width)
    local.lockstep_step(start, cache, 0, attention)
    key0, value0 = cache.keys[0][:, :, :1].contiguous(), cache.values[0][:, :, :1].contiguous()

    def torch_phase() -> None:
        slot_input = start
        for channel in range(channels):
            logits = model.audio_lm_heads[channel](local.lockstep_step(slot_input, cache, channel + 1, attention))
            slot_input = model.audio_embeddings[channel](logits.argmax(dim=-1))[:, None]

    inputs = PhaseInputs(start[:, 0], key0, value0, torch.ones(channels, 1, vocab),
                         torch.zeros(1, channels, vocab, dtype=torch.bool), torch.ones(channels, 1, 1),
                         torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long),
                         torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool), 1)
    return torch_phase, lambda: graph.run(inputs)


# The audio phase as a graph phase of the int8 format (onnx_graph.py: the per-CPU decision, set_phase, phases_of).
AUDIO_PHASE = register(GraphPhase("audio_phase", AudioPhaseGraph, _probe))


def audio_phase_graph(model) -> AudioPhaseGraph | None:
    """The model's audio phase graph where the probe kept it on this CPU, else None (onnx_graph.phase_graph)."""
    return phase_graph(model, AUDIO_PHASE)


__all__ = ["AUDIO_PHASE", "AudioPhaseGraph", "PhaseInputs", "audio_phase_graph"]
