"""What the int8 format's ONNX Runtime graphs share: the runtime, the graph builder, and the per-CPU decision.

On a CPU an int8 frame spends as much time in torch's small calls around its int8 products as in the products. Two
parts of the frame can therefore run as ONNX graphs over the same int8 values (`Int8DynamicLinear.int8_weight`;
ONNX Runtime's `DynamicQuantizeMatMul` quantises activations per tensor to 8 bits, as fbgemm does):
* the global step (onnx_global_step.py): the 12 global blocks of the frame's decision phase, reading and writing
  the decoder's own KV cache in place;
* the audio phase (onnx_audio_phase.py): the 16 local steps, heads and code picks after the text decision.

Each is a `GraphPhase`: a kernel choice of the int8 format, built once per model and kept only where a timing probe
against torch finds it faster (PROBE_MARGIN), the decision remembered per CPU and model width (cpu_choices.py).
Without onnxruntime (or onnx) installed the int8 format runs in torch; a graph that fails to build logs a warning
and its part runs in torch; the load never fails. fp32, bf16 and fp16 never use them.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .cpu_choices import remembered
from .host import return_freed_memory
from .weight_formats import weight_format_of

logger = logging.getLogger(__name__)

# The graphs' own opset (LayerNormalization, Gelu with approximate="tanh") and ONNX Runtime's contrib domain
# (DynamicQuantizeMatMul, GroupQueryAttention).
OPSET = 20
CONTRIB = "com.microsoft"
# The probe's margin: a graph is kept where it takes at most this share of torch's time.
PROBE_MARGIN = 0.9
# Where an int8 model's graph phases can run (set_phase).
RUNTIMES = ("torch", "onnxruntime")


def onnxruntime_available() -> bool:
    """Whether onnxruntime and onnx import (both are needed: one builds the graphs, the other runs them)."""
    try:
        runtime(), onnx()
    except ImportError:
        return False
    return True


# Imported by name, when first needed: transformers' remote-code check requires every package a model file names in
# an import statement, and these two are optional (int8 runs in torch without them).
def runtime():
    return importlib.import_module("onnxruntime")


def onnx():
    return importlib.import_module("onnx")


def new_session(build: Callable[[], object], threads: int | None = None):
    """An ONNX Runtime CPU session for the ModelProto `build()` returns, with `threads` intra-op threads (default:
    torch's). The proto and its serialized bytes are dropped before the session is returned, and their pages
    handed back (host.return_freed_memory): a graph holds its weights once more than the model, not three times."""
    onnxruntime = runtime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Its workers sleep between runs instead of spinning: torch's own threads run the rest of the frame on the same
    # cores (2-vCPU AMD EPYC, int8 frames: 70-74 ms with spinning, 24-33 ms without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    serialized = build().SerializeToString()
    session = onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    del serialized
    return_freed_memory()
    return session


class GraphBuilder:
    """Nodes and initializers of one graph, and the pieces both graphs are made of (linear, norm, RoPE, block).

    Args:
        block: a GPT-2 block of the decoder the graph runs (its width and heads shape the constants).
    """

    def __init__(self, block) -> None:
        self.onnx = onnx()
        self.width = block.ln_1.normalized_shape[0]
        self.heads = block.attn.num_heads
        self.head_dim = self.width // self.heads
        self.nodes, self.initializers, self.count = [], {}, 0
        heads, dim = self.heads, self.head_dim
        for name, value in (("axis_last", [-1]), ("qkv_shape", [0, 3, heads, dim]), ("split_qk_v", [2, 1]),
                            ("pair_shape", [0, 2, heads, dim // 2, 2]), ("qk_shape", [0, 2, heads, dim]),
                            ("split_q_k", [1, 1]), ("flat_shape", [0, self.width]), ("zero", [0]), ("one", [1]),
                            ("minus_one", [-1]), ("minus_three", [-3]), ("end", [2**62])):
            self.constant(name, np.array(value, dtype=np.int64))
        self.constant("zero_float", np.array(0.0, dtype=np.float32))

    def constant(self, name: str, value) -> str:
        """An initializer (once per name: repeated steps share the weights)."""
        if name not in self.initializers:
            self.initializers[name] = self.onnx.numpy_helper.from_array(np.asarray(value), name)
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attributes):
        """Append a node; returns its output name (or the list of names when outputs > 1)."""
        self.count += 1
        names = [f"{op_type}_{self.count}_{index}" for index in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, names, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def output(self, value: str, name: str) -> None:
        """Expose `value` as the graph output `name`."""
        self.nodes.append(self.onnx.helper.make_node("Identity", [value], [name]))

    def linear(self, hidden: str, layer) -> str:
        """`layer` (an Int8DynamicLinear) applied to `hidden`: its int8 weight, row scales and bias, stored once."""
        key = f"linear_{id(layer)}"
        if f"{key}.weight" not in self.initializers:
            weight, scales, bias = layer.int8_weight()
            self.constant(f"{key}.weight", weight.t().contiguous().numpy())  # [in, out], as MatMul's B
            self.constant(f"{key}.scale", scales.numpy())
            if bias is not None:
                self.constant(f"{key}.bias", bias.numpy())
        bias = [f"{key}.bias"] if f"{key}.bias" in self.initializers else []
        # weight_formats.quantization_guard: a non-finite row is zeroed for the product and made NaN after it
        poison = self.op("ReduceSum", [self.op("Mul", [hidden, "zero_float"]), "axis_last"], keepdims=1)
        clean = self.op("Where", [self.op("Equal", [poison, "zero_float"]), hidden, "zero_float"])
        product = self.op("DynamicQuantizeMatMul", [clean, f"{key}.weight", f"{key}.scale", ""] + bias, domain=CONTRIB)
        return self.op("Add", [product, poison])

    def layer_norm(self, hidden: str, norm) -> str:
        """The LayerNorm `norm` applied to `hidden` (its weight and bias stored once)."""
        key = f"norm_{id(norm)}"
        self.constant(f"{key}.weight", norm.weight.detach().float().numpy())
        self.constant(f"{key}.bias", norm.bias.detach().float().numpy())
        return self.op("LayerNormalization", [hidden, f"{key}.weight", f"{key}.bias"], axis=-1, epsilon=norm.eps)

    def rotary(self, query_key: str, cos: str, sin: str) -> str:
        """RoPE of query_key [N, 2, H, D]: x * cos + (each pair swapped) * signed sin (gpt2_decoder.apply_rotary)."""
        pairs = self.op("Reshape", [query_key, "pair_shape"])
        swapped = self.op("Reshape", [self.op("Slice", [pairs, "minus_one", "minus_three", "minus_one", "minus_one"]),
                                      "qk_shape"])
        return self.op("Add", [self.op("Mul", [query_key, cos]), self.op("Mul", [swapped, sin])])

    def block(self, hidden: str, block, rope: tuple[str, str], attend: Callable[[str, str, str], str]) -> str:
        """The pre-LN GPT-2 `block` on hidden [N, C] at one position per row. `attend(query, key, value)` gets each
        [N, 1, H, D] (query and key rotated by `rope`) and returns the attention's output [N, C]."""
        attention, mlp = block.attn, block.mlp
        qkv = self.op("Reshape", [self.linear(self.layer_norm(hidden, block.ln_1), attention.c_attn), "qkv_shape"])
        query_key, value = self.op("Split", [qkv, "split_qk_v"], outputs=2, axis=1)  # [N, 2, H, D], [N, 1, H, D]
        query, key = self.op("Split", [self.rotary(query_key, *rope), "split_q_k"], outputs=2, axis=1)
        hidden = self.op("Add", [hidden, self.linear(attend(query, key, value), attention.c_proj)])
        inner = self.op("Gelu", [self.linear(self.layer_norm(hidden, block.ln_2), mlp.fc_in)], approximate="tanh")
        return self.op("Add", [hidden, self.linear(inner, mlp.fc_out)])

    def finish(self, name: str, inputs: list[tuple], outputs: list[tuple]):
        """The ModelProto over the nodes so far (the builder is then empty); inputs and outputs as (name, element
        type, shape)."""
        helper = self.onnx.helper
        used = {value for node in self.nodes for value in node.input}  # shared constants a graph did not need go
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(*spec) for spec in inputs],
                                  [helper.make_tensor_value_info(*spec) for spec in outputs],
                                  [tensor for key, tensor in self.initializers.items() if key in used])
        self.nodes, self.initializers = [], {}  # the graph holds them now (one copy of the weights, not two)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)])
        model.ir_version = 10  # what onnxruntime 1.2x+ reads; the onnx package may write a newer default
        return model


@dataclass(frozen=True)
class GraphPhase:
    """A part of the int8 frame that can run as an ONNX graph.

    Attributes:
        name: in log lines and summaries ("global_step", "audio_phase").
        build: model -> the graph object (raises where the model does not fit it).
        probe: (model, graph) -> {"torch": seconds, "onnxruntime": seconds}, one row's best times.
    """

    name: str
    build: Callable
    probe: Callable

    @property
    def attribute(self) -> str:
        return f"_{self.name}_graph"


# Every phase a model may run as a graph, registered by the module that builds it (for summaries and bench).
PHASES: list[GraphPhase] = []


def register(phase: GraphPhase) -> GraphPhase:
    PHASES.append(phase)
    return phase


def phase_graph(model, phase: GraphPhase):
    """The model's graph for `phase` where it runs faster than torch on this CPU, else None (decided, built and
    logged once per model; the probe's decision is remembered per CPU and model width)."""
    if phase.attribute in vars(model):
        return vars(model)[phase.attribute]
    if weight_format_of(model) != "int8":  # int8 layers exist only on the CPU
        return None
    if not onnxruntime_available():
        logger.info("int8 %s: torch (onnxruntime and onnx are not installed)", phase.name)
        return set_phase(model, phase, "torch")
    built = []

    @torch.no_grad()  # whatever mode the caller is in (a model loaded under inference mode, a grad-mode thread)
    def probe() -> tuple[str, str]:
        built.append(phase.build(model))
        return _choose(phase.probe(model, built[0]))

    width = model.local_transformer.ln_f.weight.shape[0]  # a tiny test model decides for tiny models only
    try:
        choice, why = remembered(f"int8_{phase.name}_{width}", probe)
        graph = set_phase(model, phase, choice, built[0] if built else None)
    except Exception as error:  # a model or runtime the graph cannot serve costs speed, never the load
        logger.warning("int8 %s: torch (the ONNX graph failed: %s: %s)", phase.name, type(error).__name__, error)
        return set_phase(model, phase, "torch")
    logger.info("int8 %s: %s (%s)", phase.name, choice, why)
    return graph


def set_phase(model, phase: GraphPhase, choice: str, graph=None):
    """Run the int8 model's `phase` in `choice` ("torch" or "onnxruntime", which builds the graph unless given) from
    now on, whatever the probe says; returns the graph or None.

    Raises:
        ValueError: an unknown choice, or "onnxruntime" for a model not in the int8 format.
    """
    if choice not in RUNTIMES:
        raise ValueError(f"{phase.name} runtime {choice!r}; expected one of {', '.join(RUNTIMES)}")
    if choice == "onnxruntime" and weight_format_of(model) != "int8":
        raise ValueError(f"the ONNX {phase.name} runs int8 models; this one is {weight_format_of(model)}")
    if choice == "onnxruntime" and graph is None:
        graph = phase.build(model)
    graph = graph if choice == "onnxruntime" else None
    vars(model)[phase.attribute] = graph  # a plain attribute: not a submodule, never in the state dict
    return graph


def set_phases(model, choice: str) -> None:
    """`set_phase` for every registered phase (bench.py's int8-torch / int8-onnxruntime)."""
    for phase in PHASES:
        set_phase(model, phase, choice)


def phases_of(model) -> str | None:
    """Where an int8 model's graph phases run, e.g. "audio_phase=onnxruntime global_step=torch" (deciding them
    now); None for another format, which always runs in torch."""
    if weight_format_of(model) != "int8":
        return None
    return " ".join(f"{phase.name}={'torch' if phase_graph(model, phase) is None else 'onnxruntime'}"
                    for phase in sorted(PHASES, key=lambda phase: phase.name))


def best_times(runs: dict[str, Callable[[], None]], rounds: int = 5) -> dict[str, float]:
    """The best of `rounds` timed calls of each run, alternating (a probe's figures)."""
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _choose(best: dict[str, float]) -> tuple[str, str]:
    choice = "onnxruntime" if best["onnxruntime"] <= PROBE_MARGIN * best["torch"] else "torch"
    return choice, f"probe at 1 row: torch {best['torch'] * 1e3:.1f} ms, onnxruntime {best['onnxruntime'] * 1e3:.1f} ms"


__all__ = ["CONTRIB", "GraphBuilder", "GraphPhase", "OPSET", "PHASES", "PROBE_MARGIN", "RUNTIMES", "best_times",
           "new_session", "onnx", "onnxruntime_available", "phase_graph", "phases_of", "register", "runtime",
           "set_phase", "set_phases"]
