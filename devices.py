"""The device table: Ascend NPU, CUDA and CPU.

This is the only library module that names device types, imports `torch_npu` or imports `flash_attn`. Everything
else asks it: resolve a device once (`resolve_device`), take its `DeviceSpec` (`device_spec`) and pass that down.
The spec answers the device-specific questions: default and allowed dtypes, the attention backend that runs well
there, free memory for batch sizing, synchronisation, seeding, peak memory, graph capture and Ray placement.

Importing this module never imports `torch_npu` or `flash_attn`, so it works on any CPU machine. `torch_npu` is
imported lazily, the first time an NPU is asked for (or probed by "auto"); if it is installed but its CANN runtime
cannot be loaded, the error says to source CANN's `set_env.sh`.

Facts behind every choice are in the team's `spec/npu.md` (section numbers are cited as "npu.md §N").
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, MutableMapping, Optional, Union

import torch
import torch.nn.functional as F

from .host import available_bytes as host_available_bytes, peak_rss_bytes as host_peak_rss_bytes

logger = logging.getLogger(__name__)

CPU, CUDA, NPU = "cpu", "cuda", "npu"
AUTO = "auto"
# Order of "auto". NPU before CUDA: torch_npu's transfer_to_npu makes torch.cuda.is_available() report the NPU
# (npu.md §1.5), so asking CUDA first could pick "cuda" on an Ascend box.
DEVICE_TYPES = (NPU, CUDA, CPU)

# Keys of gpt2_decoder.ATTENTION_FUNCTIONS, all with the signature fn(module, query, key, value, mask, scaling).
ATTENTION_BACKENDS = ("eager", "sdpa", "flash_attention_2", "npu_fusion_attention")

# The one table of dtype names: every spelling the library accepts (torch's name first, then the short names).
DTYPES_BY_NAME = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# The dtype names resolve_dtype accepts besides "auto" (e.g. for a command line's choices).
DTYPE_NAMES = tuple(DTYPES_BY_NAME)
# flash_attn kernels exist for half precision only.
HALF_DTYPES = (torch.float16, torch.bfloat16)

# --- Device quirks --------------------------------------------------------------------------------------------------
# torch_npu's SDPA reaches its fused FlashAttentionScore kernel only with a bool mask (or none); an additive float
# mask always takes the slow math path (npu.md §2.1). So every attention mask in this project is bool, True = attend.
# torch_npu.npu_fusion_attention takes q/k/v as [B, N, S, D] ("BNSD"), which is our [B, H, T, D]: no transposes.
NPU_FUSION_LAYOUT = "BNSD"
# sparse_mode 0 applies atten_mask exactly as given. Modes 2/3 would substitute a top-left/bottom-right causal mask
# and drop our key padding (npu.md §2.2).
NPU_FUSION_SPARSE_MODE = 0
# torch.multinomial on NPU accepts fp16/fp32 input only (npu.md §0.4); sampling.py never calls it (it samples by
# argmax over float32 probabilities and exponential noise), so bf16 models sample on NPU too.
# torch.npu.mem_get_info is absent in torch_npu 2.1.0 (release 5.0.0); it exists from 2.1.0.post4 / 2.2.0
# (npu.md §1.4). Looked up with getattr: when absent, free memory is unknown and chunk batching uses batch 1.
MEM_GET_INFO = "mem_get_info"
# Share of free accelerator memory that chunk batching plans for (upstream's factor, tts.md §7.3).
FREE_MEMORY_FRACTION = 0.9
# Where CANN's environment script lives in a default install; named in the error when torch_npu cannot load.
CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"

# Environment that speeds up NPU inference, applied by apply_recommended_env() only where the user has not set it.
# - TASK_QUEUE_ENABLE=2: level-2 task queue, the recommended inference setting (honoured from release 6.0.rc3; the
#   default is 1, so setting 1 is a no-op) (npu.md §3.8).
# - PYTORCH_NPU_ALLOC_CONF=expandable_segments:True: growable segments, less fragmentation (default False). Skipped
#   when PYTORCH_ALLOC_CONF is set: TorchNPU >= 26.2 with torch >= 2.10 reads both and exits if both are set (§3.9).
RECOMMENDED_NPU_ENV = {"TASK_QUEUE_ENABLE": "2", "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"}
_ALLOC_CONF_ALTERNATIVES = {"PYTORCH_NPU_ALLOC_CONF": "PYTORCH_ALLOC_CONF"}
# Settings often recommended for Ascend that change nothing: each is already the default (npu.md §3.8, §3.10).
NO_OP_NPU_ENV = {"TASK_QUEUE_ENABLE": "1", "ASCEND_SLOG_PRINT_TO_STDOUT": "0", "ASCEND_GLOBAL_LOG_LEVEL": "3"}

_DEVICE_PATTERN = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")
_BF16_HINTS = {
    NPU: "bfloat16 needs an Ascend 910B1 or newer (Atlas A2/A3); 910A and 310P have float16/float32 only",
    CUDA: "bfloat16 needs a GPU of compute capability 8.0 or newer",
}


@dataclass(frozen=True)
class DeviceSpec:
    """Everything device-specific the library needs, resolved once per device and passed down.

    Attributes:
        device: the resolved device; accelerators carry an index (e.g. npu:0).
        type: "cpu", "cuda" or "npu".
        default_dtype: the dtype used when the caller asks for none.
        supported_dtypes: dtypes the model may run in on this device.
        default_attention: the backend for "auto" (resolve_attention may still prefer flash_attention_2 on CUDA).
        module: the device module (torch.cuda / torch.npu) for memory, sync, seeding and events; None on CPU.
        graph_class: torch.cuda.CUDAGraph / torch.npu.NPUGraph (torch_npu >= release 7.0.0) when present, else None.
        batch_by_free_memory: whether chunk batching sizes batches from free memory. False on CPU, where upstream
            uses batch 1, so chunked voice cloning on CPU draws the same random numbers as upstream.
        concatenating_draws: whether one draw of n random numbers from a generator of this device equals
            consecutive draws of the parts (CPU: one mt19937 stream, checked in tests; CUDA and NPU generators
            advance a Philox offset per call, so they do not).
    """

    device: torch.device
    type: str
    default_dtype: torch.dtype
    supported_dtypes: tuple
    default_attention: str
    module: Optional[ModuleType]
    graph_class: Optional[type]
    batch_by_free_memory: bool
    concatenating_draws: bool = False


DeviceLike = Union[str, torch.device, DeviceSpec, None]


# --- torch_npu and flash_attn, imported lazily ----------------------------------------------------------------------
def _load_torch_npu() -> Optional[ModuleType]:
    """Return the torch_npu module, importing it on first use; None when it is not installed.

    Raises:
        RuntimeError: torch_npu is installed but does not load (usually: CANN's set_env.sh was not sourced).
    """
    module = sys.modules.get("torch_npu")
    if module is not None:  # imported already, e.g. auto-loaded by `import torch` (torch >= 2.5, npu.md §1.1)
        return module
    if importlib.util.find_spec("torch_npu") is None:
        return None
    apply_recommended_env()  # before the import, as its settings require
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError, RuntimeError) as exc:
        raise RuntimeError(
            f"torch_npu is installed but could not be loaded ({exc}). Its CANN runtime is probably not set up in "
            f"this shell: run `source {CANN_SET_ENV}` (or the set_env.sh of your CANN install) first, and check "
            f"that the torch_npu version matches torch {torch.__version__} exactly."
        ) from exc


def _load_npu_module() -> Optional[ModuleType]:
    """torch.npu (registered by `import torch_npu`), or None when torch_npu is not installed."""
    torch_npu = _load_torch_npu()
    if torch_npu is None:
        return None
    return getattr(torch, NPU, None) or getattr(torch_npu, NPU)


def _load_cuda_module() -> ModuleType:
    """torch.cuda; a seam for tests that simulate a GPU on a CPU-only machine."""
    return torch.cuda


@functools.lru_cache(maxsize=None)
def _flash_attn_func() -> Optional[Callable]:
    """flash_attn.flash_attn_func when the package imports, else None (probed once per process)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        logger.warning("flash_attn is installed but does not import (%s); attention falls back to sdpa", exc)
        return None


def _probe_npu() -> bool:
    """True when torch_npu loads and at least one NPU is visible. A broken install is logged, not raised."""
    try:
        module = _load_npu_module()
    except RuntimeError as exc:
        logger.warning("%s Device 'auto' skips the NPU.", exc)
        return False
    return module is not None and bool(module.is_available()) and module.device_count() > 0


def _probe_cuda() -> bool:
    module = _load_cuda_module()
    return bool(module.is_available()) and module.device_count() > 0


def available_device_types() -> list:
    """The device types usable in this process, in the order "auto" prefers them (always ends with "cpu")."""
    found = [NPU] if _probe_npu() else []
    return found + ([CUDA] if _probe_cuda() else []) + [CPU]


# --- Device resolution ----------------------------------------------------------------------------------------------
def resolve_device(name: DeviceLike = AUTO) -> torch.device:
    """Turn a user's device choice into a concrete, available torch.device.

    Args:
        name: "auto" or None (NPU if torch_npu loads and an NPU is visible, else CUDA, else CPU), "cpu", "cuda",
            "cuda:N", "npu", "npu:N", a torch.device or a DeviceSpec. Case and surrounding spaces are ignored.

    Returns:
        The device; accelerators get an explicit index (the current device when none was given).

    Raises:
        ValueError: an unknown name, or a device that this machine does not have.
        RuntimeError: an NPU was asked for and torch_npu is installed but cannot load (names CANN's set_env.sh).
    """
    if isinstance(name, DeviceSpec):
        return name.device
    if name is None or (isinstance(name, str) and name.strip().lower() == AUTO):
        return _auto_device()
    if isinstance(name, torch.device):
        kind, index = name.type, name.index
    elif isinstance(name, str):
        match = _DEVICE_PATTERN.match(name.strip().lower())
        if match is None:
            raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N', 'npu' or 'npu:N'")
        kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    else:
        raise ValueError(f"device must be a string or torch.device, got {type(name).__name__} {name!r}")
    if kind == CPU:
        return torch.device(CPU)
    if kind not in (CUDA, NPU):
        raise ValueError(f"unsupported device type {kind!r} in {name!r}; expected one of {list(DEVICE_TYPES)}")
    return _accelerator_device(kind, index, name)


def _auto_device() -> torch.device:
    kind = NPU if _probe_npu() else CUDA if _probe_cuda() else CPU
    device = torch.device(CPU) if kind == CPU else _accelerator_device(kind, None, AUTO)
    logger.info("device 'auto' resolved to %s", device)
    return device


def _accelerator_device(kind: str, index: Optional[int], requested: Any) -> torch.device:
    """Check that device `kind`:`index` exists here and return it with an explicit index."""
    module = _load_npu_module() if kind == NPU else _load_cuda_module()
    if module is None:
        raise ValueError(f"device {requested!r} needs torch_npu, which is not installed; install the torch_npu "
                         f"build matching torch {torch.__version__} and your CANN, or use one of "
                         f"{available_device_types()}")
    count = module.device_count() if module.is_available() else 0
    if count == 0:
        raise ValueError(f"device {requested!r} was requested but no {kind} device is visible "
                         f"({'ASCEND_RT_VISIBLE_DEVICES' if kind == NPU else 'CUDA_VISIBLE_DEVICES'}, drivers); "
                         f"expected one of {available_device_types()}")
    if index is None:
        index = module.current_device()
    if index >= count:
        raise ValueError(f"device {requested!r} does not exist: {count} {kind} device(s) visible, "
                         f"expected an index in 0..{count - 1}")
    return torch.device(kind, index)


# --- The table ------------------------------------------------------------------------------------------------------
def _cpu_spec(device: torch.device) -> DeviceSpec:
    # fp32 is the reference; bf16/fp16 run on CPU too (slowly) and are allowed as explicit choices.
    return DeviceSpec(device=torch.device(CPU), type=CPU, default_dtype=torch.float32,
                      supported_dtypes=(torch.float32, torch.bfloat16, torch.float16), default_attention="sdpa",
                      module=None, graph_class=None, batch_by_free_memory=False, concatenating_draws=True)


def _cuda_spec(device: torch.device) -> DeviceSpec:
    module = _load_cuda_module()
    try:  # native bf16 only (Ampere+): torch >= 2.3 would otherwise also count slow emulation
        bf16 = bool(module.is_bf16_supported(including_emulation=False))
    except TypeError:
        bf16 = bool(module.is_bf16_supported())
    half = (torch.bfloat16, torch.float16) if bf16 else (torch.float16,)
    return DeviceSpec(device=device, type=CUDA, default_dtype=half[0], supported_dtypes=half + (torch.float32,),
                      default_attention="sdpa", module=module, graph_class=getattr(module, "CUDAGraph", None),
                      batch_by_free_memory=True)


def _npu_spec(device: torch.device) -> DeviceSpec:
    module = _load_npu_module()
    if module is None:
        raise ValueError(f"device {device} needs torch_npu, which is not installed")
    # fp16 is the NPU default: every Ascend SoC has it; bf16 only from 910B1 (is_bf16_supported, npu.md §1.2).
    bf16 = bool(getattr(module, "is_bf16_supported", lambda: False)())
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if bf16 else ())
    # SDPA with a bool mask is torch_npu's fused path on 910B+ (npu.md §2.1); NPUGraph exists from release 7.0.0.
    return DeviceSpec(device=device, type=NPU, default_dtype=torch.float16, supported_dtypes=dtypes,
                      default_attention="sdpa", module=module, graph_class=getattr(module, "NPUGraph", None),
                      batch_by_free_memory=True)


_SPEC_BUILDERS = {CPU: _cpu_spec, CUDA: _cuda_spec, NPU: _npu_spec}


def device_spec(device: DeviceLike = AUTO) -> DeviceSpec:
    """The DeviceSpec of a device.

    Args:
        device: anything resolve_device accepts; a DeviceSpec is returned unchanged. A torch.device is taken as
            given (not checked for availability), so the spec of a tensor's device is cheap.

    Returns:
        The frozen spec (default dtype, supported dtypes, attention default, device module, graph class).
    """
    if isinstance(device, DeviceSpec):
        return device
    if not isinstance(device, torch.device) or device.type not in _SPEC_BUILDERS:
        device = resolve_device(device)
    return _SPEC_BUILDERS[device.type](device)


def _as_spec(device: DeviceLike) -> DeviceSpec:
    return device if isinstance(device, DeviceSpec) else device_spec(device)


# --- dtype ----------------------------------------------------------------------------------------------------------
def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A torch.dtype, or its name in DTYPES_BY_NAME (case, spaces and a "torch." prefix ignored).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES_BY_NAME:
            return DTYPES_BY_NAME[key]
    raise ValueError(f"unknown dtype {dtype!r}; expected 'auto', None, a torch.dtype or one of "
                     f"{sorted(DTYPES_BY_NAME)}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module prefix: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(device: DeviceLike, dtype: Union[str, torch.dtype, None] = None) -> torch.dtype:
    """The model dtype for a device: its default, or the caller's choice once checked.

    Args:
        device: anything device_spec accepts.
        dtype: None or "auto" for the device default (NPU fp16, CUDA bf16 where native else fp16, CPU fp32), or
            a torch.dtype / name ("float32", "fp16", "bf16", ...).

    Returns:
        The torch.dtype.

    Raises:
        ValueError: an unknown name, or a dtype the device cannot run (e.g. bf16 on an Ascend 910A).
    """
    spec = _as_spec(device)
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == AUTO):
        return spec.default_dtype
    resolved = parse_dtype(dtype)
    if resolved not in spec.supported_dtypes:
        hint = _BF16_HINTS.get(spec.type, "") if resolved == torch.bfloat16 else ""
        supported = [dtype_name(d) for d in spec.supported_dtypes]
        raise ValueError(f"dtype {dtype!r} is not supported on {spec.device}; expected one of {supported}"
                         + (f" ({hint})" if hint else ""))
    return resolved


# --- Attention ------------------------------------------------------------------------------------------------------
def resolve_attention(requested: Optional[str], device: DeviceLike, dtype: Union[str, torch.dtype, None]) -> str:
    """The attention backend to run, as a key of gpt2_decoder.ATTENTION_FUNCTIONS.

    "auto"/None gives the device default: flash_attention_2 on CUDA when flash_attn imports and the dtype is
    fp16/bf16, sdpa otherwise (on NPU, sdpa with our bool mask is torch_npu's fused kernel). A known backend that
    cannot run here (the released config's "flash_attention_2" on CPU or NPU, "npu_fusion_attention" off NPU) is
    replaced by the device default with one log line; it never raises.

    Args:
        requested: None, "auto", "eager", "sdpa", "flash_attention_2" or "npu_fusion_attention".
        device: anything device_spec accepts.
        dtype: the model dtype (None/"auto" = the device default).

    Returns:
        The backend name.

    Raises:
        ValueError: an unknown backend name (or an unsupported dtype, see resolve_dtype).
    """
    spec = _as_spec(device)
    dtype = resolve_dtype(spec, dtype)
    name = AUTO if requested is None else requested
    if not isinstance(name, str) or name.strip().lower() not in ATTENTION_BACKENDS + (AUTO,):
        raise ValueError(f"unknown attention implementation {requested!r}; expected None, 'auto' or one of "
                         f"{list(ATTENTION_BACKENDS)}")
    name = name.strip().lower()
    default = _default_attention(spec, dtype)
    if name == AUTO:
        return default
    reason = _attention_blocker(name, spec, dtype)
    if reason is None:
        return name
    logger.info("attention %r cannot run on %s (%s); using %r", name, spec.device, reason, default)
    return default


def _default_attention(spec: DeviceSpec, dtype: torch.dtype) -> str:
    if spec.type == CUDA and _attention_blocker("flash_attention_2", spec, dtype) is None:
        return "flash_attention_2"
    return spec.default_attention


def _attention_blocker(name: str, spec: DeviceSpec, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run on `spec` in `dtype`, or None when it can."""
    if name in ("eager", "sdpa"):
        return None
    if name == "flash_attention_2":
        if spec.type != CUDA:
            return "flash_attn is a CUDA-only package"
        if dtype not in HALF_DTYPES:
            return f"flash_attn needs float16/bfloat16, the model runs in {dtype}"
        return None if _flash_attn_func() is not None else "flash_attn is not installed or does not import"
    if spec.type != NPU:
        return "it is a torch_npu kernel"
    return None if hasattr(_load_torch_npu(), "npu_fusion_attention") else "this torch_npu lacks it"


def _sdpa(query, key, value, mask, scaling):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def flash_attention(module, query, key, value, mask, scaling):
    """CUDA attention through flash_attn, with SDPA wherever flash_attn_func would not be exact.

    flash_attn_func(causal=True) has no mask argument, so it is used only when the mask is exactly causal over
    T_q == T_k keys (a whole unpadded sequence). Left padding, decode steps (T_q = 1 over a KV cache) and any other
    mask run SDPA with the same bool mask, which is exact for every mask; for single-query decode it is also as fast.
    Checking the mask reads it on the host: one sync per call, and only when T_q == T_k > 1 (prefill).

    Args:
        module: the calling attention module (unused).
        query: [B, H, T_q, D]; key, value: [B, H, T_k, D].
        mask: bool, True = attend, broadcastable to [B, 1, T_q, T_k].
        scaling: the softmax scale.

    Returns:
        [B, H, T_q, D].
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    flash = _flash_attn_func()
    if flash is None or query.dtype not in HALF_DTYPES or q_len == 1 or q_len != k_len:
        return _sdpa(query, key, value, mask, scaling)
    if mask is not None:
        mask = mask.expand(*mask.shape[:-2], q_len, k_len)
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
        if not torch.equal(mask, causal.expand_as(mask)):
            return _sdpa(query, key, value, mask, scaling)
    out = flash(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling, causal=True)
    return out.transpose(1, 2)  # flash_attn works in [B, T, H, D]


def npu_fusion_attention(module, query, key, value, mask, scaling):
    """Attention through torch_npu.npu_fusion_attention (layout BNSD, sparse_mode 0, the mask inverted).

    Note: torch_npu documents this op for training and not for graph mode (npu.md §2.2); the default NPU backend,
    sdpa with a bool mask, reaches the same fused kernel. This one exists to check and compare that kernel.

    Args:
        module: the calling attention module (unused).
        query: [B, H, T_q, D]; key, value: [B, H_kv, T_k, D] (H a multiple of H_kv).
        mask: bool, True = attend, broadcastable to [B, 1, T_q, T_k]; never a fully False row.
        scaling: the softmax scale.

    Returns:
        [B, H, T_q, D].
    """
    masked = None if mask is None else _npu_fusion_mask(mask, query.shape[-2], key.shape[-2])
    outputs = _load_torch_npu().npu_fusion_attention(
        query, key, value, query.shape[1], NPU_FUSION_LAYOUT, atten_mask=masked, scale=scaling,
        sparse_mode=NPU_FUSION_SPARSE_MODE)
    return outputs[0]  # the op returns 7 values; the first is the attention output


def _npu_fusion_mask(mask: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Our mask (True = attend, broadcastable to [B, 1, T_q, T_k]) as the op wants it: True = masked, 4-D
    with full [T_q, T_k] trailing dims (it accepts BNSS, B1SS and 11SS, npu.md §2.2)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return torch.logical_not(mask.expand(mask.shape[0], mask.shape[1], q_len, k_len))


# --- Memory and batch sizing ----------------------------------------------------------------------------------------
def free_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Free memory of a device in bytes, or None when it cannot be known.

    CUDA and NPU use their module's mem_get_info (free, total); on torch_npu 2.1.0 it does not exist and the answer
    is None. (The allocator's "allocated_bytes.all.current" is memory in use, not free, npu.md §0.1.) CPU reports
    the host's available memory (MemAvailable from /proc/meminfo, else sysconf).
    """
    spec = _as_spec(device)
    if spec.module is None:
        return host_available_bytes()
    query = getattr(spec.module, MEM_GET_INFO, None)
    if query is None:
        logger.info("%s has no %s (torch_npu 2.1.0?); free memory unknown", spec.device, MEM_GET_INFO)
        return None
    try:
        free, _total = query(spec.device)
    except RuntimeError as exc:
        logger.warning("free-memory query on %s failed (%s)", spec.device, exc)
        return None
    return int(free)


def chunk_batch_size(device: DeviceLike, num_chunks: int, gb_per_sample: float) -> int:
    """How many voice-clone text chunks to generate together.

    min(num_chunks, max(1, int(0.9 * free) // per-sample bytes)), as upstream does on CUDA; 1 when free memory is
    unknown, gb_per_sample <= 0, there is at most one chunk, or the device is the CPU (upstream's choice, which
    keeps CPU sampling identical to upstream).

    Args:
        device: anything device_spec accepts.
        num_chunks: the number of text chunks.
        gb_per_sample: planned memory per sample in GiB (upstream default 1.0).

    Returns:
        The batch size, 1..max(1, num_chunks).
    """
    spec = _as_spec(device)
    per_sample = int(gb_per_sample * 2**30) if gb_per_sample > 0 else 0
    if num_chunks <= 1 or per_sample <= 0 or not spec.batch_by_free_memory:
        return 1
    free = free_memory_bytes(spec)
    if free is None:
        return 1
    return min(num_chunks, max(1, int(free * FREE_MEMORY_FRACTION) // per_sample))


def peak_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Peak memory in bytes; None when unknown.

    Accelerators report the allocator's peak of allocated bytes since the last reset_peak_memory. CPU reports the
    process's peak resident set size (VmHWM, or ru_maxrss where /proc is missing): the whole process, not only
    tensors, since it started or since /proc/self/clear_refs last reset it.
    """
    spec = _as_spec(device)
    if spec.module is not None:
        query = getattr(spec.module, "max_memory_allocated", None)
        return None if query is None else int(query(spec.device))
    return host_peak_rss_bytes()


def reset_peak_memory(device: DeviceLike) -> None:
    """Start a new peak-memory window on an accelerator (its allocator's peak statistics).

    On CPU nothing is reset: peak_memory_bytes reports the process's peak RSS, which only a benchmark resets (by
    writing /proc/self/clear_refs, as verify_npu.py does per row; a library does not touch process-wide state).
    """
    spec = _as_spec(device)
    reset = getattr(spec.module, "reset_peak_memory_stats", None)
    if reset is not None:
        reset(spec.device)


# --- Sync and seeds -------------------------------------------------------------------------------------------------
def synchronize(device: DeviceLike) -> None:
    """Wait for all queued work on the device (a no-op on CPU)."""
    spec = _as_spec(device)
    if spec.module is not None:
        spec.module.synchronize(spec.device)


def manual_seed(device: DeviceLike, seed: int) -> None:
    """Seed the CPU generator and the device's generators.

    Note: the same seed draws different samples on NPU (on-device Philox) than on CPU/CUDA (npu.md §1.3).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    spec = _as_spec(device)
    torch.manual_seed(seed)  # CPU, and (torch/random.py) every CUDA and custom-device generator
    seed_all = getattr(spec.module, "manual_seed_all", None)
    if seed_all is not None:  # explicit, for torch versions that do not seed custom devices themselves
        seed_all(seed)


def new_generator(device: DeviceLike, seed: int) -> torch.Generator:
    """A private torch.Generator seeded with `seed`, for random numbers used on `device`.

    It lives on the device where the device type has its own generators (CPU, CUDA, Ascend NPU); a backend without
    them (e.g. a python-level device, such as the tests' simulated NPU) gets a CPU generator, and whoever draws from
    it moves the numbers to the device.
    """
    spec = _as_spec(device)
    try:
        return torch.Generator(device=spec.device).manual_seed(seed)
    except RuntimeError as error:
        logger.info("no generators on %s (%s); drawing random numbers on the CPU", spec.device, error)
        return torch.Generator().manual_seed(seed)


# --- Graph capture --------------------------------------------------------------------------------------------------
def graph_supported(device: DeviceLike) -> bool:
    """Whether the device can capture and replay a graph (CUDAGraph; NPUGraph from torch_npu release 7.0.0)."""
    spec = _as_spec(device)
    return spec.graph_class is not None and hasattr(spec.module, "graph")


def compile_backend(device: DeviceLike) -> str:
    """The torch.compile backend for fixed-shape decode steps on the device.

    "inductor" on CPU and CUDA. On NPU, torch_npu's aclgraph backend "npugraph_ex" (release >= 7.3.0; it wants
    fullgraph=True, dynamic=False and no mode=) when registered, else its torchair backend "npu" (npu.md §1.6).
    Untested on NPU hardware.
    """
    spec = _as_spec(device)
    if spec.type != NPU:
        return "inductor"
    from torch._dynamo import list_backends  # lazy: importing dynamo is slow and only needed here

    return "npugraph_ex" if "npugraph_ex" in list_backends(exclude_tags=()) else "npu"


def capture_graph(device: DeviceLike, fn: Callable[[], None], warmup: int = 3) -> Optional[Callable[[], None]]:
    """Capture `fn` (no arguments; reads and writes only tensors it keeps) into a device graph.

    The warm-up calls run on a side stream, as torch's graph docs ask (lazy inits and allocator pools settle
    before capture). Random ops must stay outside `fn` (NPU graphs cannot capture them, npu.md §1.6).
    Untested on hardware in this project (no CUDA or NPU machine); the caller falls back to eager on None.

    Args:
        device: the device of every tensor `fn` touches.
        fn: the fixed-shape step; it must not allocate tensors it returns, or sync with the host.
        warmup: eager calls before capture.

    Returns:
        `replay()` that re-runs the captured work, or None where the device has no graphs (CPU).
    """
    spec = _as_spec(device)
    if not graph_supported(spec):
        return None
    module = spec.module
    side = module.Stream(device=spec.device)
    side.wait_stream(module.current_stream(spec.device))
    with module.stream(side):
        for _ in range(warmup):
            fn()
    module.current_stream(spec.device).wait_stream(side)
    graph = spec.graph_class()
    with module.graph(graph):
        fn()
    return graph.replay


# --- Ray Serve placement --------------------------------------------------------------------------------------------
# Ray's resource for one card of each accelerator type (NVIDIA: `num_gpus`; Ascend: the resource "NPU"). Ray places a
# replica on a node with a free card and shows it that card alone, so inside it the index is 0 and --device has none.
RAY_RESOURCES = {NPU: "NPU", CUDA: "GPU"}


def ray_replica_type(device: str) -> str:
    """The device type ("npu", "cuda" or "cpu") of a Ray Serve replica's --device.

    Raises:
        ValueError: "auto" (Ray places a replica by its resources before it starts, so the type must be given) or a
            device with an index (Ray picks the card).
    """
    match = _DEVICE_PATTERN.match(str(device).strip().lower())
    if match is None or match.group(2) is not None:
        raise ValueError(f"device {device!r} for a Ray Serve replica; expected 'npu', 'cuda' or 'cpu' without an "
                         "index (Ray places the replica on a free card of that type and shows it that card only)")
    return match.group(1)


def ray_actor_options(device: str, num_cpus: float) -> dict:
    """Ray actor options for one replica on one card of `device`'s type, with `num_cpus` host CPUs:
    {"num_cpus": n, "resources": {"NPU": 1}} for npu, {"num_cpus": n, "num_gpus": 1} for cuda, {"num_cpus": n} for cpu.
    """
    kind = ray_replica_type(device)
    if num_cpus <= 0:
        raise ValueError(f"num_cpus={num_cpus} for a Ray Serve replica; expected a positive number")
    options = {"num_cpus": num_cpus}
    if kind == CUDA:
        options["num_gpus"] = 1
    elif kind == NPU:
        options["resources"] = {RAY_RESOURCES[NPU]: 1}
    return options


# --- Environment ----------------------------------------------------------------------------------------------------
def apply_recommended_env(environ: Optional[MutableMapping[str, str]] = None) -> dict:
    """Set the recommended NPU environment (RECOMMENDED_NPU_ENV) in `environ` (default os.environ) where the user has
    not set it; returns the variables it set. It only has an effect before torch_npu is imported (torch >= 2.5 with
    torch_npu >= 2.5.1 imports it inside `import torch`: export them in the shell, see README); it also runs right
    before this module imports torch_npu itself. NO_OP_NPU_ENV lists popular settings that change nothing.
    """
    env = os.environ if environ is None else environ
    applied = {}
    for key, value in RECOMMENDED_NPU_ENV.items():
        alternative = _ALLOC_CONF_ALTERNATIVES.get(key)
        if key in env or (alternative is not None and alternative in env):
            continue
        env[key] = value
        applied[key] = value
    if applied and environ is None and "torch_npu" in sys.modules:
        logger.info("torch_npu is already imported, so %s may not take effect; export them before starting Python",
                    sorted(applied))
    elif applied:
        logger.info("applied the recommended NPU environment %s", applied)
    return applied
