"""Weight formats chosen at load time: fp32 (exact upstream outputs), bf16 / fp16 (16-bit weights) and int8 (CPU).

A decode step of MOSS-TTS-Nano is bound by how many weight bytes it reads (one global step of 12 layers plus 17 local
steps per frame, batch 1), so the storage format of the Linear weights sets the speed. `apply_weight_format` converts
a loaded model in place and logs one line naming the format; nothing is ever converted silently.

| format | weights                          | activations | where              | quality (teacher-forced audio logits) |
|--------|----------------------------------|-------------|--------------------|---------------------------------------|
| fp32   | float32 (the reference)          | float32     | every device       | exact: greedy codes equal upstream    |
| bf16   | bfloat16                         | bfloat16 (1) | every device      | cosine vs fp32 >= 0.999               |
| fp16   | float16                          | float16     | every device       | cosine vs fp32 >= 0.999               |
| int8   | int8, one scale per output row   | float32, quantised per call (dynamic) | CPU only | cosine vs fp32 >= 0.995  |

(1) float32 on CPUs where oneDNN cannot pack bf16 weights (AVX2-only): see `Bf16WeightLinear` below.

Measured teacher-forced audio-logit cosine vs fp32 (minimum over every logit vector; tests/test_weight_formats.py):

| CPU                          | int8 kernel                                 | golden tiny model | full-size random |
|------------------------------|---------------------------------------------|-------------------|------------------|
| Xeon, AVX-512 BF16 + VNNI    | weights in [-127, 127], 8-bit activations   | -                 | 0.9991           |
| AMD EPYC, AVX2 only          | weights in [-63, 63], 8-bit activations     | 0.99716           | 0.99813          |
| AMD EPYC, AVX2 only (before) | weights in [-127, 127], 7-bit activations   | 0.99403 (< 0.995) | 0.99680          |

CPU kernels (why the formats are not just `model.to(dtype)`):
* fp32: float32 weights either way, with the faster of two kernels for this CPU, decided once by a short timing
  probe (`fp32_linear_kernel`): MKL's F.linear, or oneDNN's linear over a weight reordered once (`PackedLinear`).
  The load line names the choice. Loading without a weight format (the Python API, or the CLI's `plain`) keeps
  torch's own nn.Linear, upstream's exact kernels.
* bf16: a plain bf16 `F.linear` of one row is no faster than fp32 on CPU. oneDNN's linear with a weight reordered once
  into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the op torch.compile's CPU freezing uses) reads
  half the bytes and runs about 1.7x faster per Linear, so on CPU every block Linear and audio head becomes a
  `PackedLinear`. That op runs only on some CPUs (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU
  it raises), so a one-time trial on a tiny weight (`onednn_packing_available`, cached) decides. Where it fails
  (AVX2-only CPUs), every block Linear and audio head becomes a `Bf16WeightLinear` (bf16 weights read by torch's
  reduced-precision GEMV, float32 activations) and the rest of the model stays float32: on an AMD EPYC with AVX2
  that measured 10-15 % faster per frame than a model all in bf16, whose norms, attention and casts run slowly in
  bf16 there, and it is closer to fp32. The load log line names the kernel chosen.
* int8: `Int8DynamicLinear` holds a per-output-channel symmetric int8 copy of the weight, packed once for fbgemm /
  oneDNN (`torch.ops.quantized.linear_prepack`), and quantises each input row to uint8 (8 bits) on the fly
  (`torch.ops.quantized.linear_dynamic`). These are the kernels behind torch's dynamic quantisation, called directly
  (the `torch.ao.quantization` front end is deprecated). About 3.5x faster than fp32 per Linear at batch 1.
  Without VNNI, fbgemm adds each pair of uint8 x int8 products in int16 (saturating at 32767). torch's usual answer
  is 7-bit activations, which cost accuracy (0.99403 above); here the weights use [-63, 63] instead, so a pair stays
  at most 2 x 255 x 63 = 32130 and 8-bit activations never saturate (measured: the kernel equals a float64
  emulation to 1e-7 relative; [-127, 127] weights with 8-bit activations are off by up to 35%). With VNNI the
  products go straight to int32 and the weights use [-127, 127]. Each int8 frame's global step and its 16 local
  steps (the audio phase) run as ONNX Runtime calls over these same int8 values where a probe at load finds that
  faster (onnx_graph.py), else in torch.
* fp16 has no fast batch-1 CPU kernel; it is offered for accelerators and runs correctly (not faster) on CPU.
* The codec (not a weight format: it always keeps its float32 values) stores its decoder's Linear weights K-major on
  CPUs where a probe finds MKL faster that way (`codec_weight_layout`, applied by `use_codec_cpu_layout` when the
  pipeline loads the codec); elsewhere, and off the CPU, they stay row-major.

Tied weights: `text_lm_head` shares `transformer.wte.weight` and `audio_lm_heads[c]` shares
`audio_embeddings[c].weight` (spec tts.md §2.3). Embedding lookups need the float table, so a converted audio head is a
separate packed/quantised *copy*; the embedding keeps the float weight. The text head is never converted: decoding uses
only its two rows of the stop decision, read from the (float) embedding table. After a conversion, the head modules
no longer share storage with the embeddings, so apply the format last (after loading, tying and moving the model)
and do not call `tie_weights` again; to go back, load the model again.

The quality check is teacher forcing (measurement/teacher_forcing.py): the audio logits of every channel of every frame, computed
with the same (reference) tokens fed in, compared with the fp32 model's (tests/test_weight_formats.py, and
`verify_npu.py --weight-formats` against the bounds of verification.TOLERANCES).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import devices
from .cpu_choices import remembered

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8")
# Parameter dtype of each format (int8 keeps float32 for everything that is not a converted Linear). A dtype name
# (devices.DTYPES_BY_NAME: "float32", "bfloat16", "half", ...) names the first format of its dtype.
FORMAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
# Modules that are never converted: the text head (tied to wte; decoding reads two rows of the float table).
_KEEP_FLOAT = ("text_lm_head",)
# int8 weight range: [-127, 127] where VNNI accumulates in int32; [-63, 63] where fbgemm adds pairs of uint8 x int8
# products in int16 (no VNNI), so 8-bit activations stay below its saturation (see the module docstring).
INT8_WEIGHT_MAX_VNNI, INT8_WEIGHT_MAX_INT16_PAIRS = 127, 63


def normalize_weight_format(weight_format: str | None) -> str:
    """The canonical name of a weight format ("fp32", "bf16", "fp16" or "int8"); None means "fp32".

    Raises:
        ValueError: for an unknown name.
    """
    if weight_format is None:
        return "fp32"
    key = str(weight_format).strip().lower().removeprefix("torch.")
    if key in WEIGHT_FORMATS:
        return key
    if key == "qint8":
        return "int8"
    dtype = devices.DTYPES_BY_NAME.get(key)
    for name, format_dtype in FORMAT_DTYPES.items():
        if dtype == format_dtype:
            return name
    raise ValueError(f"unknown weight format {weight_format!r}; expected one of {list(WEIGHT_FORMATS)}")


# ----------------------------------------------------------------------------------------------------------------
# Converted Linear modules (frozen, inference only)


@functools.lru_cache(maxsize=None)
def onednn_packing_available() -> bool:
    """Whether oneDNN's reorder-once bf16 linear runs here: a one-time trial on a 16 x 16 weight (cached).

    The op exists in every x86 build of torch but raises on CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, so only
    a call tells. The reason of a failure is logged once (INFO).
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        logger.info("oneDNN bf16 packing: not in this torch build")
        return False
    weight = torch.ones(16, 16, dtype=torch.bfloat16)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        output = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=torch.bfloat16), packed, None, "none",
                                                    [], "")
    except (AttributeError, RuntimeError) as error:
        logger.info("oneDNN bf16 packing does not run on this CPU: %s", str(error).splitlines()[0])
        return False
    return bool(torch.equal(output.float(), torch.full((1, 16), 16.0)))


# Kernel probes time the usual choice against a candidate, interleaved, and take the candidate only when it is this
# much faster (summed over the probe's shapes), so that timing noise keeps the usual choice.
PROBE_MIN_GAIN = 1.1
# The fp32 kernel probe: a block-sized Linear (768 -> 3072) timed at batch 1 and 8, best of PROBE_RUNS calls each.
PROBE_SHAPE, PROBE_BATCHES, PROBE_RUNS = (3072, 768), (1, 8), 15


@functools.lru_cache(maxsize=None)
def fp32_linear_kernel() -> tuple[str, str]:
    """("packed" or "plain", why): the faster fp32 Linear kernel on this CPU. The first load on a machine decides by a
    short timing probe (`_probe_fp32_linear_kernel`) and the decision is remembered per CPU model, torch version and
    thread count (cpu_choices.py), so that every later run on the machine runs the same kernel."""
    return remembered("fp32_linear", _probe_fp32_linear_kernel)


def _probe_fp32_linear_kernel() -> tuple[str, str]:
    """The timing probe behind `fp32_linear_kernel`.

    MKL's F.linear is fast on some x86 CPUs and slow on others (on an AMD EPYC with AVX2, measured 4x slower at
    batch 4 than at batch 1 while oneDNN's packed linear is 1.3x slower); oneDNN's linear with a weight reordered
    once into its blocked layout reads the same float32 weights, so outputs match to float rounding (the golden
    greedy and seeded codes stay identical, tests/test_weight_formats.py). The probe takes about 50 ms.
    """
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "plain", "oneDNN linear not in this torch build"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_SHAPE, generator=generator)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except RuntimeError as error:
        return "plain", f"oneDNN fp32 packing does not run here ({str(error).splitlines()[0]})"
    pairs = []
    for batch in PROBE_BATCHES:
        hidden = torch.randn(batch, PROBE_SHAPE[1], generator=generator)
        pairs.append((functools.partial(F.linear, hidden, weight),
                      functools.partial(torch.ops.mkldnn._linear_pointwise, hidden, packed, None, "none", [], "")))
    plain_us, packed_us = _summed_best_us(pairs, PROBE_RUNS)
    kernel = "packed" if plain_us >= PROBE_MIN_GAIN * packed_us else "plain"
    return kernel, f"probe at batch 1 + 8: F.linear {plain_us:.0f} us, oneDNN packed {packed_us:.0f} us"


# The codec's layout probe: CODEC_PROBE_WEIGHTS feed-forward-sized codec Linears (256 -> 1024, 16 MB in all, so that
# they stream through the caches as a frame's 38 MB of decoder weights do) at the rows of the first and last decoder
# stages for one streamed frame (4 and 32 tokens), best of CODEC_PROBE_RUNS passes each.
CODEC_PROBE_SHAPE, CODEC_PROBE_ROWS, CODEC_PROBE_WEIGHTS, CODEC_PROBE_RUNS = (1024, 256), (4, 32), 16, 8


@functools.lru_cache(maxsize=None)
def codec_weight_layout() -> tuple[str, str]:
    """("k-major" or "row-major", why): how the codec decoder's float32 Linear weights are laid out on this CPU,
    decided once by a short timing probe (`_codec_probe_us`).

    F.linear reads a weight stored as the transpose of a contiguous [in, out] tensor (K-major) with MKL's
    non-transposed GEMM, which on some CPUs runs the codec's 4-32-row products faster once the weights are out of
    cache (an AMD EPYC with AVX2: 1.2-1.3x, about 9 % of a streamed frame; with warm weights the two layouts tie, so
    the probe streams weights through the caches). Values and state-dict keys do not change, only the memory order,
    so outputs match to float rounding, and either answer is correct: a busy host may get either.
    """
    row_us, k_major_us = _codec_probe_us()
    layout = "k-major" if row_us >= PROBE_MIN_GAIN * k_major_us else "row-major"
    return layout, f"probe at 4 + 32 rows: row-major {row_us:.0f} us, K-major {k_major_us:.0f} us"


def _codec_probe_us() -> tuple[float, float]:
    """Per-weight time (us, summed over CODEC_PROBE_ROWS) of row-major and K-major codec Linears; about 0.2 s."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(CODEC_PROBE_SHAPE, generator=generator) for _ in range(CODEC_PROBE_WEIGHTS)]
    k_major = [weight.t().contiguous().t() for weight in weights]
    pairs = []
    for rows in CODEC_PROBE_ROWS:
        hidden = torch.randn(rows, CODEC_PROBE_SHAPE[1], generator=generator)
        pairs.append((functools.partial(_linear_all, hidden, weights), functools.partial(_linear_all, hidden, k_major)))
    row_us, k_major_us = _summed_best_us(pairs, CODEC_PROBE_RUNS)
    return row_us / len(weights), k_major_us / len(weights)


def _linear_all(hidden: torch.Tensor, weights: list) -> None:
    for weight in weights:
        F.linear(hidden, weight)


def codec_layout_for(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(layout, why): how a codec decoder's Linear weights are laid out on `device` in `dtype`: "k-major" or
    "row-major" as `codec_weight_layout` chooses for float32 on the CPU, "row-major" (contiguous, what accelerator
    kernels expect) on other devices, "as loaded" for 16-bit decoders."""
    if dtype != torch.float32:
        return "as loaded", "not a float32 codec decoder"
    if torch.device(device).type != "cpu":
        return "row-major", "not on the CPU"
    return codec_weight_layout()


def use_codec_cpu_layout(codec: nn.Module) -> str:
    """Lay out the Linear weights of a codec's decoder as `codec_layout_for` says, in place; returns the layout with
    its reason, for a log line. The encoder keeps its weights as loaded (it runs thousands of rows, where the layouts
    tie)."""
    decoder = getattr(codec, "decoder", None)
    if decoder is None:
        return "weights as loaded (not a float32 codec decoder)"
    parameter = next(decoder.parameters())
    layout, why = codec_layout_for(parameter.device, parameter.dtype)
    if layout == "as loaded":
        return f"weights as loaded ({why})"
    _lay_out(decoder, k_major=layout == "k-major")
    return f"{layout} Linear weights ({why})"


def lay_out_k_major(module: nn.Module) -> int:
    """Store each nn.Linear weight of `module` as the transpose of a contiguous [in, out] tensor (same values, same
    parameter objects); returns how many were laid out anew."""
    return _lay_out(module, k_major=True)


def lay_out_row_major(module: nn.Module) -> int:
    """Make each nn.Linear weight of `module` contiguous again (undoes `lay_out_k_major`); returns how many moved."""
    return _lay_out(module, k_major=False)


def _lay_out(module: nn.Module, k_major: bool) -> int:
    count = 0
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.weight.is_contiguous() == k_major:
            weight = linear.weight.data
            linear.weight.data = weight.t().contiguous().t() if k_major else weight.contiguous()
            count += 1
    return count


def _summed_best_us(pairs, runs: int) -> tuple[float, float]:
    """Summed over (usual, candidate) call pairs: the best time (us) of each call over `runs` interleaved rounds."""
    usual_us = candidate_us = 0.0
    for usual, candidate in pairs:
        usual_best, candidate_best = _best_calls_us(usual, candidate, runs=runs)
        usual_us, candidate_us = usual_us + usual_best, candidate_us + candidate_best
    return usual_us, candidate_us


def _best_calls_us(*calls, runs: int = PROBE_RUNS) -> list[float]:
    """The best time of each call over `runs` rounds, the calls interleaved (a busy machine slows both alike)."""
    best = [float("inf")] * len(calls)
    for round_index in range(runs + 1):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if round_index:  # the first round warms up
                best[index] = min(best[index], time.perf_counter() - start)
    return [seconds * 1e6 for seconds in best]


def cpu_has_vnni() -> bool:
    """Whether the CPU has AVX-512 VNNI (int8 dot products accumulated straight into int32)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private but stable since torch 2.3; False if absent
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has AVX-512 BF16 (without it oneDNN emulates bf16 and is slower than fp32)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def int8_weight_max() -> int:
    """The largest int8 weight magnitude: 127 with VNNI, else 63 so that 8-bit activations cannot saturate fbgemm's
    int16 pair sums (2 x 255 x 63 = 32130 <= 32767; see the module docstring)."""
    return INT8_WEIGHT_MAX_VNNI if cpu_has_vnni() else INT8_WEIGHT_MAX_INT16_PAIRS


def int8_kernels_available() -> bool:
    """Whether this torch build has the fbgemm/oneDNN dynamic int8 linear (x86 CPUs)."""
    try:
        return bool(torch.backends.quantized.supported_engines) and hasattr(torch.ops.quantized, "linear_dynamic")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """A frozen Linear whose weight oneDNN reordered once into its blocked layout (CPU bf16 decoding).

    The packed weight is a plain attribute, not a parameter or buffer: it is not in the state_dict and does not
    follow `.to()`. Build it on the device and dtype it will run in.

    Args:
        linear: the source nn.Linear (its weight is copied; the source can be dropped or stay tied elsewhere).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out] in the weight's dtype."""
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn-packed"


class Bf16WeightLinear(nn.Module):
    """A frozen Linear with a bfloat16 weight and bias inside a float32 model (CPU bf16 where oneDNN cannot pack).

    Each call rounds its input to bf16, runs torch's bf16 GEMV (which reads half the bytes of fp32) and returns
    float32, so the norms, attention and sampling around it stay float32.

    Args:
        linear: the source nn.Linear (copied; the source can stay tied elsewhere).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().to(torch.bfloat16).contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [..., in] -> float32 [..., out]."""
        return F.linear(hidden.to(torch.bfloat16), self.weight, self.bias).float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weights, float32 activations"


def quantization_guard(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(poison [..., 1]: 0 in finite rows, NaN in a row holding NaN or inf; the rows with the bad ones zeroed).

    Dynamic int8 quantises a call's activations with ONE range over all rows, and the engine's rows are different
    requests: a non-finite value in one row would set every row's scale (or make fbgemm refuse the call), so one
    request going non-finite would end its neighbours. Its row is zeroed for the product instead and gets NaN back
    after it (`product + poison`; adding 0 leaves the other rows' values as they are), so its own logits still
    come out non-finite and only it fails. (onnx_graph.py's products quantise each row alone and need no guard.)
    """
    poison = (hidden * 0).sum(dim=-1, keepdim=True)  # inf * 0 and NaN * 0 are NaN
    return poison, torch.where(poison == 0, hidden, 0.0)


class Int8DynamicLinear(nn.Module):
    """A frozen Linear with an int8 weight (symmetric, one scale per output row) and float32 inputs/outputs.

    Each call quantises its input per tensor (uint8, 8 bits, dynamic range) and runs the fbgemm/oneDNN int8 GEMM; the
    bias is added in float32.

    Args:
        linear: the source nn.Linear (float weights; copied).
        weight_max: largest weight magnitude, 127 or 63 (default: `int8_weight_max()` for this CPU).
    """

    def __init__(self, linear: nn.Linear, weight_max: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_max = int8_weight_max() if weight_max is None else weight_max
        weight = linear.weight.detach().float().cpu()
        scales = (weight.abs().amax(dim=1) / self.weight_max).clamp_min(1e-12).double()  # [out]
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 deprecates creating quantized tensors; linear_prepack still takes only them (remove when
            # torch ships a plain-int8 prepack for these kernels).
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*", category=UserWarning)
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self._packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [..., in] -> float32 [..., out]. A row holding NaN or inf is kept out of the per-tensor
        quantisation and comes out as NaN (`quantization_guard`; one sum tells whether any row needs it)."""
        if math.isfinite(hidden.sum()):  # False: 8-bit activations
            return torch.ops.quantized.linear_dynamic(hidden, self._packed, False)
        poison, clean = quantization_guard(hidden)
        return torch.ops.quantized.linear_dynamic(clean, self._packed, False) + poison

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(int8 weight [out, in], float32 scale per output row [out], float32 bias [out] or None), unpacked: the
        values this layer multiplies by, for another runtime to run them (onnx_graph.py)."""
        quantized, bias = torch.ops.quantized.linear_unpack(self._packed)
        scales = quantized.q_per_channel_scales().float()
        return quantized.int_repr(), scales, None if bias is None else bias.float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel in "
                f"[-{self.weight_max}, {self.weight_max}]")


# ----------------------------------------------------------------------------------------------------------------
# Applying a format


def _convertible_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) for every nn.Linear except the text head."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and qualified not in _KEEP_FLOAT:
                found.append((parent, child_name, child))
    return found


def _replace_linears(model: nn.Module, build) -> int:
    """Swap every convertible Linear for `build(linear)`; returns how many were swapped."""
    targets = _convertible_linears(model)
    for parent, name, linear in targets:
        parent._modules[name] = build(linear)  # also works for ModuleList children ("0", "1", ...)
    return len(targets)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def apply_weight_format(model: nn.Module, weight_format: str | None = "fp32") -> nn.Module:
    """Convert a loaded MossTTSNanoForCausalLM to a weight format, in place, and log the result.

    Call it last: after loading, tying and moving the model to its device (see the module docstring).

    Args:
        model: the model (any device; int8 needs CPU).
        weight_format: "fp32", "bf16", "fp16" or "int8" (aliases "float32", "bfloat16", "float16"); None = fp32.

    Returns:
        The same model, in eval mode.

    Raises:
        ValueError: an unknown format, a format the device cannot run (per devices.resolve_dtype), int8 off the
            CPU or without int8 kernels, or a model that was already converted to another format.
    """
    fmt = normalize_weight_format(weight_format)
    device = _model_device(model)
    spec = devices.device_spec(device)
    if _has_converted_linears(model):  # packed / int8 copies cannot be turned back into float weights
        current = weight_format_of(model)
        if current != fmt:
            raise ValueError(f"model already uses weight format {current!r}; reload it to use {fmt!r}")
        return model
    reason = format_unavailable_reason(spec, fmt)
    if reason is not None:
        raise ValueError(reason)
    model.to(compute_dtype(spec, fmt)).eval()
    detail = _convert_linears(model, fmt, spec)
    logger.info("weight format %s on %s: %s", fmt, device, detail)
    return model


def compute_dtype(device, weight_format: str) -> torch.dtype:
    """The dtype the model computes in under `weight_format` on `device`: FORMAT_DTYPES's, except float32 for bf16
    on a CPU where oneDNN cannot pack bf16 weights (they become `Bf16WeightLinear` layers in a float32 model)."""
    fmt = normalize_weight_format(weight_format)
    if fmt == "bf16" and devices.device_spec(device).type == devices.CPU and not onednn_packing_available():
        return torch.float32
    return FORMAT_DTYPES[fmt]


def faster_format_hint(device, weight_format: str) -> str | None:
    """One line naming a faster weight format this CPU runs well than `weight_format` (fp32), or None.

    int8 wherever torch has its x86 int8 kernels: with or without VNNI it decodes 2-3.5x faster than fp32
    (`bench.py --section lm`: 3.5x on a Xeon with VNNI, 1.7-3.1x on an AVX2-only AMD EPYC, a busy shared VM); else bf16
    where the CPU has AVX-512 BF16 and oneDNN packs bf16 weights. fp32 stays the default because it is upstream-exact.
    """
    spec = devices.device_spec(device)
    if spec.type != devices.CPU or normalize_weight_format(weight_format) != "fp32":
        return None
    if int8_kernels_available():
        return ("--weight-format int8 decodes 2-3.5x faster than fp32 on x86 CPUs, with or without VNNI "
                "(teacher-forced audio-logit cosine vs fp32 >= 0.995); fp32 stays the default because it is "
                "upstream-exact")
    if cpu_has_native_bf16() and onednn_packing_available():
        return ("this CPU has AVX-512 BF16: --weight-format bf16 decodes about 1.5x faster (cosine vs fp32 >= 0.999); "
                "fp32 stays the default because it is upstream-exact")
    return None


def format_unavailable_reason(device, weight_format: str | None) -> str | None:
    """Why a device cannot run a weight format, or None when it can; cheap, so callers check before loading.

    Args:
        device: anything devices.device_spec accepts (a string, torch.device or DeviceSpec).
        weight_format: a name normalize_weight_format accepts.

    Returns:
        None, or the reason (e.g. int8 off the CPU, bf16 on an Ascend 910A).

    Raises:
        ValueError: an unknown format name.
    """
    fmt = normalize_weight_format(weight_format)
    spec = devices.device_spec(device)
    try:
        devices.resolve_dtype(spec, FORMAT_DTYPES[fmt])
    except ValueError as exc:  # e.g. bf16 on an Ascend 910A
        return f"weight format {fmt!r}: {exc}"
    if fmt == "int8" and spec.type != devices.CPU:
        return f"weight format 'int8' runs on CPU only, not on {spec.device} (use 'bf16' or 'fp16' on accelerators)"
    if fmt == "int8" and not int8_kernels_available():
        return "weight format 'int8' runs on CPU with fbgemm/oneDNN int8 kernels, which this torch build lacks"
    return None


def _convert_linears(model: nn.Module, fmt: str, spec) -> str:
    """Swap Linears for the CPU kernels of `fmt`; returns a description (naming the kernel) for the log line."""
    if fmt == "int8":
        weight_max = int8_weight_max()
        count = _replace_linears(model, lambda linear: Int8DynamicLinear(linear, weight_max))
        why = "" if weight_max == INT8_WEIGHT_MAX_VNNI else ", halved as this CPU has no VNNI"
        return (f"{count} Linear layers int8 (per-channel weights in [-{weight_max}, {weight_max}]{why}, dynamic 8-bit "
                "activations), embeddings, norms and text head float32")
    if fmt == "bf16" and spec.type == devices.CPU:
        if onednn_packing_available():
            count = _replace_linears(model, PackedLinear)
            native = "" if cpu_has_native_bf16() else " (this CPU has no AVX-512 BF16: expect no speed-up over fp32)"
            return f"{count} Linear layers bf16 in oneDNN's packed layout, embeddings and text head bf16{native}"
        count = _replace_linears(model, Bf16WeightLinear)
        return (f"{count} Linear layers with bf16 weights and float32 activations (oneDNN's packed bf16 linear does "
                "not run on this CPU), embeddings, norms, attention and text head float32")
    if fmt == "fp32" and spec.type == devices.CPU:
        kernel, why = fp32_linear_kernel()
        if kernel == "packed":
            count = _replace_linears(model, PackedLinear)
            return f"{count} Linear layers float32 in oneDNN's packed layout, faster here than F.linear ({why})"
        return f"all parameters float32, F.linear kernels ({why})"
    return f"all parameters {str(FORMAT_DTYPES[fmt]).removeprefix('torch.')}"


def _has_converted_linears(model: nn.Module) -> bool:
    return any(isinstance(module, (PackedLinear, Bf16WeightLinear, Int8DynamicLinear)) for module in model.modules())


def dtype_change_unavailable_reason(model: nn.Module) -> str | None:
    """Why `model.to(dtype)` cannot change the dtype this model computes in, or None when it can.

    Packed bf16 and int8 layers are frozen copies that do not follow `.to()` (see the module docstring); a plain
    dtype format (fp32, fp16, bf16 without packing) casts back and forth exactly.
    """
    for fmt, description, frozen in (("bf16", "oneDNN-packed bf16", _packed_16_bit), ("int8", "int8", _int8),
                                     ("bf16", "bf16-weight", _bf16_weight)):
        count = sum(frozen(module) for module in model.modules())
        if count:
            return (f"its weight format {fmt!r} holds {count} {description} Linear layers, which model.to() cannot "
                    "convert")
    return None


def _packed_16_bit(module: nn.Module) -> bool:
    return isinstance(module, PackedLinear) and module.packed_weight.dtype != torch.float32


def _int8(module: nn.Module) -> bool:
    return isinstance(module, Int8DynamicLinear)


def _bf16_weight(module: nn.Module) -> bool:
    return isinstance(module, Bf16WeightLinear)


def stored_weight_bytes(module: nn.Module) -> int | None:
    """Bytes a call of a Linear-like module reads from its weight and bias as stored (packed, int8 with its float32
    row scales, or a plain nn.Linear); None for any other module."""
    if isinstance(module, Int8DynamicLinear):
        return module.in_features * module.out_features + 8 * module.out_features  # int8 weight, scales and bias
    if isinstance(module, (PackedLinear, Bf16WeightLinear)):
        weight = module.packed_weight if isinstance(module, PackedLinear) else module.weight
        bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
        return module.in_features * module.out_features * weight.element_size() + bias
    if isinstance(module, nn.Linear):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    return None


def linear_kernel_of(model: nn.Module) -> str:
    """How the model's block Linears run: "int8", "onednn-packed" or "plain" (torch's nn.Linear)."""
    if any(isinstance(module, Int8DynamicLinear) for module in model.modules()):
        return "int8"
    if any(isinstance(module, PackedLinear) for module in model.modules()):
        return "onednn-packed"
    if any(isinstance(module, Bf16WeightLinear) for module in model.modules()):
        return "bf16-weights"
    return "plain"


def weight_format_of(model: nn.Module) -> str:
    """The weight format a model runs in: "int8" if it holds Int8DynamicLinear layers, else from its dtype."""
    if any(isinstance(module, Int8DynamicLinear) for module in model.modules()):
        return "int8"
    if any(isinstance(module, Bf16WeightLinear) for module in model.modules()):
        return "bf16"
    dtype = next(model.parameters()).dtype
    for name, format_dtype in FORMAT_DTYPES.items():
        if dtype == format_dtype:
            return name
    return devices.dtype_name(dtype)


__all__ = [
    "Bf16WeightLinear",
    "FORMAT_DTYPES",
    "Int8DynamicLinear",
    "PackedLinear",
    "WEIGHT_FORMATS",
    "apply_weight_format",
    "codec_layout_for",
    "codec_weight_layout",
    "compute_dtype",
    "cpu_has_native_bf16",
    "cpu_has_vnni",
    "dtype_change_unavailable_reason",
    "format_unavailable_reason",
    "int8_kernels_available",
    "int8_weight_max",
    "lay_out_k_major",
    "lay_out_row_major",
    "normalize_weight_format",
    "onednn_packing_available",
    "quantization_guard",
    "stored_weight_bytes",
    "use_codec_cpu_layout",
    "weight_format_of",
]
