"""What the int8 format's ONNX Runtime graphs share: the runtime, the graph builder, and the per-CPU decision.

On a CPU an int8 frame spends as much time in torch's small calls around its int8 products as in the products. Two
parts of the frame can therefore run as ONNX graphs over the same int8 weights (`Int8DynamicLinear.int8_weight`):
* the global step (onnx_global_step.py): the 12 global blocks of the frame's decision phase, reading and writing
  the decoder's own KV cache in place, and the local decoder's step 0 after them;
* the audio phase (onnx_audio_phase.py): the 16 local steps, heads and code picks after the text decision.

Their products are ONNX Runtime's `MatMulNBits` at 8 bits with int8 compute (accuracy_level 4): each row's
activations are quantised to 8 bits per block of BLOCK_COLUMNS columns, where torch's int8 (fbgemm) quantises a
call's activations with one range over all rows. So in a graph no row's values depend on its neighbours' (rows are
different requests; from two rows on a row's output is bit-identical whatever the others hold), and a row holding NaN
or inf cannot reach another row: each graph only turns such a row's outputs to NaN (`GraphBuilder.poison`), so that
its request fails alone, with non_finite_logits, as in torch. The rounding differs from fbgemm's, not its size (on
the tests' decoder both are within 6e-4 of the float32 step). On a 2-vCPU AMD EPYC (Zen 4, VNNI) the kernel reads a
768 x 3072 weight at one row in 55-100 us, against 90-150 us for `DynamicQuantizeMatMul` (per-tensor ranges, as
fbgemm), which it replaced: int8 frames 17.8-19.6 -> 14.6-16.8 ms (GroupQueryAttention's own RoPE and local step 0
in the global graph then took them to 12.3 ms).

Each is a `GraphPhase`: a kernel choice of the int8 format, built once per model and kept only where a timing probe
against torch finds it faster (PROBE_MARGIN), the decision remembered per CPU and model width (cpu_choices.py).
Without onnxruntime (or onnx) installed the int8 format runs in torch; a graph that fails to build logs a warning
and its part runs in torch; the load never fails. fp32, bf16 and fp16 never use them.
"""

from __future__ import annotations

import functools
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
# (MatMulNBits, GroupQueryAttention).
OPSET = 20
CONTRIB = "com.microsoft"
# The probe's margin: a graph is kept where it takes at most this share of torch's time.
PROBE_MARGIN = 0.9
# Where an int8 model's graph phases can run (set_phase).
RUNTIMES = ("torch", "onnxruntime")
# How close the product kernel must come to float64 arithmetic in `check_products` (cosine; 8-bit activations
# round each row to about 0.4% of its largest value; measured 0.99997 on a Zen 4 EPYC).
AGREEMENT = 0.999
# Columns per activation range in the graphs' products (MatMulNBits' block_size: a power of two from 16 to 256 that
# divides the layer's input width; 256 for every layer at the released size).
BLOCK_COLUMNS = 256
# MatMulNBits' int8 compute: activations quantised per row and block, int8 dot products (the fast path on x86).
INT8_COMPUTE = 4


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
        block: a GPT-2 block of the decoder the graph runs (its width and heads shape the constants), or None for a
            graph of products only (`check_products`).
    """

    def __init__(self, block=None) -> None:
        self.onnx = onnx()
        self.nodes, self.initializers, self.count = [], {}, 0
        self.shapes = {}  # each product's (rows, columns, block), by its weight's key
        self.constant("zero_float", np.array(0.0, dtype=np.float32))
        self.constant("axis_last", np.array([-1], dtype=np.int64))
        if block is None:
            return
        self.width = block.ln_1.normalized_shape[0]
        self.heads = block.attn.num_heads
        self.head_dim = self.width // self.heads
        for name, value in (("flat_shape", [0, self.width]), ("cache_shape", [0, self.heads, 1, self.head_dim]),
                            ("zero", [0]), ("one", [1])):
            self.constant(name, np.array(value, dtype=np.int64))

    def constant(self, name: str, value) -> str:
        """An initializer (once per name: repeated steps share the weights)."""
        if name not in self.initializers:
            self.initializers[name] = self.onnx.numpy_helper.from_array(np.asarray(value), name)
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", names=None, **attributes):
        """Append a node; returns its output name (or the list of names when outputs > 1). `names`: the outputs'
        names where given (None: a fresh one)."""
        self.count += 1
        names = [given or f"{op_type}_{self.count}_{index}"
                 for index, given in enumerate(names or [None] * outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, names, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def output(self, value: str, name: str) -> None:
        """Expose `value` as the graph output `name`."""
        self.nodes.append(self.onnx.helper.make_node("Identity", [value], [name]))

    def linear(self, hidden: str, layer) -> str:
        """`layer` (an Int8DynamicLinear) applied to `hidden`: its int8 weight, row scales and bias, stored once.

        MatMulNBits stores 8-bit weights unsigned, as [out, blocks, block] with a zero point of 128 (its default), and
        one scale per row and block: here the row's own scale repeated, so the weights are exactly the layer's."""
        key = f"linear_{id(layer)}"
        if key not in self.shapes:
            self._store(key, layer)
        rows, columns, block = self.shapes[key]
        bias = [f"{key}.bias"] if f"{key}.bias" in self.initializers else []
        inputs = [hidden, f"{key}.weight", f"{key}.scale"] + (["", ""] + bias if bias else [])
        return self.op("MatMulNBits", inputs, domain=CONTRIB, K=columns, N=rows, bits=8, block_size=block,
                       accuracy_level=INT8_COMPUTE)

    def _store(self, key: str, layer) -> None:
        weight, scales, bias = layer.int8_weight()
        rows, columns = weight.shape
        block = block_columns(columns)
        self.constant(f"{key}.weight", (weight.to(torch.int16) + 128).to(torch.uint8)
                      .reshape(rows, columns // block, block).numpy())
        self.constant(f"{key}.scale", scales[:, None].expand(rows, columns // block).reshape(-1).numpy())
        if bias is not None:
            self.constant(f"{key}.bias", bias.numpy())
        self.shapes[key] = rows, columns, block

    def poison(self, *values: str) -> str:
        """[N, 1]: 0 in rows whose `values` (each [N, ...]) are all finite, NaN in a row holding NaN or inf; added to
        a graph's outputs, it makes such a row's outputs NaN (inf * 0 and NaN * 0 are NaN)."""
        sums = [self.op("ReduceSum", [self.op("Flatten", [self.op("Mul", [value, "zero_float"])], axis=1),
                                      "axis_last"], keepdims=1) for value in values]
        return sums[0] if len(sums) == 1 else self.op("Sum", sums)

    def layer_norm(self, hidden: str, norm) -> str:
        """The LayerNorm `norm` applied to `hidden` (its weight and bias stored once)."""
        key = f"norm_{id(norm)}"
        self.constant(f"{key}.weight", norm.weight.detach().float().numpy())
        self.constant(f"{key}.bias", norm.bias.detach().float().numpy())
        return self.op("LayerNormalization", [hidden, f"{key}.weight", f"{key}.bias"], axis=-1, epsilon=norm.eps)

    def block(self, hidden: str, block, attend: Callable[[str], str]) -> str:
        """The pre-LN GPT-2 `block` on hidden [N, C] at one position per row. `attend(qkv)` gets the packed
        projections [N, 1, 3C] (queries, keys, values, each head after head) and returns the attention's output
        [N, C] (`attention`)."""
        attention, mlp = block.attn, block.mlp
        qkv = self.op("Unsqueeze", [self.linear(self.layer_norm(hidden, block.ln_1), attention.c_attn), "one"])
        hidden = self.op("Add", [hidden, self.linear(attend(qkv), attention.c_proj)])
        inner = self.op("Gelu", [self.linear(self.layer_norm(hidden, block.ln_2), mlp.fc_in)], approximate="tanh")
        return self.op("Add", [hidden, self.linear(inner, mlp.fc_out)])

    def first_position(self, hidden: str, block) -> tuple[str, str, str]:
        """`block` at position 0 of an empty cache, hidden [N, C]: (hidden, key, value), the key and value [N, H, 1, D]
        as the cache holds them. There the query attends to its own key only, whose softmax weight is exactly 1, so
        the attention's output is the value; and RoPE at position 0 is the identity (cos 1, sin 0)."""
        parts = []

        def attend(qkv: str) -> str:
            parts.extend(self.op("Split", [qkv], outputs=3, axis=2, num_outputs=3)[1:])  # key, value [N, 1, C]
            return self.op("Reshape", [parts[1], "flat_shape"])

        hidden = self.block(hidden, block, attend)
        key, value = (self.op("Reshape", [part, "cache_shape"]) for part in parts)
        return hidden, key, value

    def attention(self, qkv: str, past: tuple[str, str], present: tuple[str, str], lengths: tuple[str, str],
                  rope: tuple[str, str], scale: float) -> str:
        """ONNX Runtime's GroupQueryAttention for one new position per row: RoPE on the new query and key (adjacent
        pairs, as gpt2_decoder.apply_rotary; `rope`: the cos and sin of each position's frequencies [positions,
        D / 2]), the key and value appended to `past` (keys, values [N, H, S, D]) as `present`, and the query
        attending to every position up to its own. `lengths`: each row's past length [N] (int32; its new position)
        and the batch's largest total (a scalar). Returns [N, C]."""
        mixed, *_ = self.op("GroupQueryAttention", [qkv, "", "", *past, *lengths, *rope], outputs=3,
                            domain=CONTRIB, num_heads=self.heads, kv_num_heads=self.heads, scale=scale, do_rotary=1,
                            rotary_interleaved=1, names=[None, *present])
        return self.op("Reshape", [mixed, "flat_shape"])

    def finish(self, name: str, inputs: list[tuple], outputs: list[tuple]):
        """The ModelProto over the nodes so far (the builder is then empty); inputs and outputs as (name, element
        type, shape)."""
        helper = self.onnx.helper
        used = {value for node in self.nodes for value in node.input}  # shared constants a graph did not need go
        graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(*spec) for spec in inputs],
                                  [helper.make_tensor_value_info(*spec) for spec in outputs],
                                  [tensor for key, tensor in self.initializers.items() if key in used])
        # the graph holds them now (one copy of the weights, not two)
        self.nodes, self.initializers, self.shapes = [], {}, {}
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

    @property
    def span(self) -> str:
        """The torch.profiler span its graph's runs open (measurement/frame_profile.py)."""
        return f"{self.name} graph"


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
        check_products(width)
        built.append(phase.build(model))
        return _choose(phase.probe(model, built[0]))

    width = model.local_transformer.ln_f.weight.shape[0]  # a tiny test model decides for tiny models only
    try:
        choice, why = remembered(decision_name(phase, width), probe)
        graph = set_phase(model, phase, choice, built[0] if built else None)
    except Exception as error:  # a model or runtime the graph cannot serve costs speed, never the load
        logger.warning("int8 %s: torch (the ONNX graph failed: %s: %s)", phase.name, type(error).__name__, error)
        return set_phase(model, phase, "torch")
    logger.info("int8 %s: %s (%s)", phase.name, choice, why)
    return graph


def decision_name(phase: GraphPhase, width: int) -> str:
    """The remembered decision's name: a new product kernel (or ONNX Runtime version) is probed afresh."""
    return f"int8_{phase.name}_{width} MatMulNBits8 onnxruntime {runtime().__version__}"


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


def rope_frequencies(rope, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupQueryAttention's RoPE tables from the decoder's `rope` (gpt2_decoder's rotary embedding): the cos and sin
    of each frequency at positions 0..positions - 1, [positions, D / 2] each, float32 (its tables repeat each
    frequency over a pair, the sin signed -, +)."""
    cos, signed_sin = rope.table(positions, torch.float32, torch.device("cpu"))
    return cos[:positions, 0::2].contiguous(), signed_sin[:positions, 1::2].contiguous()


def block_columns(columns: int) -> int:
    """The activation range's block for a product over `columns` inputs (module docstring).

    Raises:
        ValueError: no power of two from 16 to BLOCK_COLUMNS divides `columns` (the graph is not built; the phase
            then runs in torch).
    """
    for block in (BLOCK_COLUMNS >> shift for shift in range(5)):
        if columns % block == 0:
            return block
    raise ValueError(f"an int8 product over {columns} inputs; the graphs need a multiple of 16")


@functools.cache
def check_products(columns: int) -> None:
    """Raise unless the graphs' product kernel computes, on this CPU, what the int8 values mean: one product over
    `columns` inputs at 1 and 3 rows (the kernel differs by row count) against float64 arithmetic on the same int8
    weights. A guard against a kernel that does something else on a CPU the tests never ran on (8-bit weights beside
    8-bit activations can overflow 16-bit pair sums); the phase then runs in torch, with a warning (`phase_graph`).

    Raises:
        ValueError: naming the cosine found.
    """
    generator = torch.Generator().manual_seed(0)
    layer = _Int8Values(torch.randint(-127, 128, (64, columns), generator=generator, dtype=torch.int8),
                        torch.rand(64, generator=generator) * 1e-2 + 1e-3)
    builder = GraphBuilder()
    builder.output(builder.linear("hidden", layer), "product")
    types = onnx().TensorProto
    session = new_session(lambda: builder.finish("product_check", [("hidden", types.FLOAT, ["N", columns])],
                                                 [("product", types.FLOAT, ["N", 64])]), 1)
    weight = layer.weight.double() * layer.scales.double()[:, None]
    for rows in (1, 3):
        hidden = torch.randn(rows, columns, generator=generator) * torch.logspace(0, 2, rows)[:, None]
        got = torch.from_numpy(session.run(None, {"hidden": hidden.numpy()})[0]).double()
        cosine = float(torch.nn.functional.cosine_similarity(got, hidden.double() @ weight.T).min())
        if not cosine >= AGREEMENT:
            raise ValueError(f"MatMulNBits computes something else on this CPU (cosine {cosine:.4f} to float64 at "
                             f"{rows} rows, expected >= {AGREEMENT})")


@dataclass(frozen=True)
class _Int8Values:
    """What `GraphBuilder.linear` reads of a layer (`Int8DynamicLinear.int8_weight`), for `check_products`."""

    weight: torch.Tensor
    scales: torch.Tensor

    def int8_weight(self):
        return self.weight, self.scales, None


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


__all__ = ["AGREEMENT", "BLOCK_COLUMNS", "CONTRIB", "GraphBuilder", "GraphPhase", "INT8_COMPUTE", "OPSET", "PHASES",
           "PROBE_MARGIN", "RUNTIMES", "best_times", "block_columns", "check_products", "decision_name",
           "new_session", "onnx", "onnxruntime_available", "phase_graph", "phases_of", "register", "rope_frequencies",
           "runtime", "set_phase", "set_phases"]
