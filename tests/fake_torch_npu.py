"""A small fake `torch_npu` for routing tests on machines without Ascend hardware or CANN.

This is the project's own level-1 fake: it makes `torch.device("npu:0")`, `import torch_npu` and `torch.npu` work,
with knobs for what the tests vary (availability, device count, free memory, bf16 support, a missing
`mem_get_info` as on torch_npu 2.1.0) and counters for what they check. No tensor can live on "npu" here; the team's
level-2 fake (../shared/tools/fake_npu.py, used through the `fake_npu_path` fixture) does that.

`install()` renames torch's PrivateUse1 backend to "npu". That is process-global and permanent, so call it only in a
process of its own: a `@pytest.mark.forked` test or a subprocess.

`npu_fusion_attention` is a CPU reference of torch_npu's op for what devices.py uses: layout BNSD, sparse_mode 0,
`atten_mask` with True = masked. It records every call so tests can check the arguments.
"""

from __future__ import annotations

import collections
import importlib.abc
import importlib.machinery
import os
import sys
import time
import types
from dataclasses import dataclass, field

import torch


@dataclass
class FakeNpuState:
    """Knobs (set before or after install) and counters of the fake."""

    available: bool = True
    device_count: int = 1
    current_device: int = 0
    free_bytes: int = 30 << 30
    total_bytes: int = 64 << 30
    allocated_bytes: int = 0  # what the earlier port read as "free": memory already in use
    peak_bytes: int = 0
    initialized: bool = False  # memory_stats() is {} until the runtime starts, as in torch_npu
    bf16_supported: bool = True  # False: Ascend 910A / 310P
    synchronize_calls: int = 0
    seeds: list = field(default_factory=list)
    peak_resets: int = 0
    fusion_calls: list = field(default_factory=list)  # kwargs of each npu_fusion_attention call
    env_at_import: dict = None  # install_on_import(): ENV_TO_RECORD as seen when torch_npu was imported


STATE = FakeNpuState()
# Environment variables whose values install_on_import() records at the moment torch_npu is imported.
ENV_TO_RECORD = ("TASK_QUEUE_ENABLE", "PYTORCH_NPU_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


class _Event:
    """torch.npu.Event stand-in: host clock, elapsed_time in milliseconds."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing = enable_timing
        self.recorded_at = None

    def record(self, stream=None):
        self.recorded_at = time.perf_counter()

    def synchronize(self):
        STATE.synchronize_calls += 1

    def elapsed_time(self, end):
        return (end.recorded_at - self.recorded_at) * 1000.0


def _start_runtime(device=None):
    STATE.initialized = True


def _mem_get_info(device=None):
    _start_runtime()
    return STATE.free_bytes, STATE.total_bytes


def _memory_stats(device=None):
    if not STATE.initialized:
        return collections.OrderedDict()
    return collections.OrderedDict([("allocated_bytes.all.current", STATE.allocated_bytes),
                                    ("allocated_bytes.all.peak", STATE.peak_bytes)])


def _synchronize(device=None):
    STATE.synchronize_calls += 1


def _manual_seed(seed):
    STATE.seeds.append(int(seed))
    torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: that calls back into torch.npu


def _reset_peak(device=None):
    STATE.peak_resets += 1
    STATE.peak_bytes = STATE.allocated_bytes


def _npu_module() -> types.ModuleType:
    npu = types.ModuleType("torch_npu.npu")
    npu.__spec__ = importlib.machinery.ModuleSpec("torch_npu.npu", None)
    npu.is_available = lambda: STATE.available and STATE.device_count > 0
    npu.device_count = lambda: STATE.device_count if STATE.available else 0
    npu.current_device = lambda: STATE.current_device
    npu.is_initialized = lambda: STATE.initialized
    npu.synchronize = _synchronize
    npu.mem_get_info = _mem_get_info
    npu.memory_stats = _memory_stats
    npu.max_memory_allocated = lambda device=None: STATE.peak_bytes
    npu.reset_peak_memory_stats = _reset_peak
    npu.manual_seed = npu.manual_seed_all = _manual_seed
    npu.is_bf16_supported = lambda: STATE.bf16_supported
    npu.get_amp_supported_dtype = lambda: [torch.float16, torch.float32] + [torch.bfloat16] * STATE.bf16_supported
    npu.Event = _Event
    return npu


def npu_fusion_attention(query, key, value, head_num, input_layout, *, atten_mask=None, scale=1.0,
                         sparse_mode=0, **unused):
    """CPU reference of torch_npu.npu_fusion_attention for layout BNSD and sparse_mode 0 (True = masked)."""
    STATE.fusion_calls.append(dict(head_num=head_num, input_layout=input_layout, scale=scale,
                                   sparse_mode=sparse_mode, mask_dtype=None if atten_mask is None else atten_mask.dtype,
                                   mask_shape=None if atten_mask is None else tuple(atten_mask.shape)))
    if input_layout != "BNSD" or sparse_mode != 0 or head_num != query.shape[1]:
        raise NotImplementedError(f"fake npu_fusion_attention: {input_layout}, sparse_mode {sparse_mode}")
    if atten_mask is not None and (atten_mask.dim() not in (2, 4) or atten_mask.dtype != torch.bool):
        raise RuntimeError("atten_mask must be a bool SS/B1SS/BNSS/11SS tensor")
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if atten_mask is not None:
        scores = scores.masked_fill(atten_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    empty = query.new_empty(0)
    return out, empty, empty, empty, 0, 0, 0


def _register(knobs: dict) -> types.ModuleType:
    """Set the knobs, rename PrivateUse1 to "npu", register torch.npu and return the fake torch_npu package."""
    has_mem_get_info = knobs.pop("mem_get_info", True)
    for name, value in knobs.items():
        if not hasattr(STATE, name):
            raise TypeError(f"unknown knob {name!r}")
        setattr(STATE, name, value)
    torch.utils.rename_privateuse1_backend("npu")
    package = types.ModuleType("torch_npu")
    package.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None, is_package=True)
    package.__path__ = []
    package.__version__ = "2.13.0+projectfake"
    package.npu = _npu_module()
    if not has_mem_get_info:
        del package.npu.mem_get_info
    package.npu_fusion_attention = npu_fusion_attention
    torch._register_device_module("npu", package.npu)
    return package


def install(**knobs) -> FakeNpuState:
    """Install the fake now and return STATE. `mem_get_info=False` drops torch.npu.mem_get_info (torch_npu 2.1.0)."""
    if "torch_npu" in sys.modules:
        raise RuntimeError("torch_npu is already imported; the fake must run in a fresh process")
    package = _register(dict(knobs))
    sys.modules["torch_npu"] = package
    sys.modules["torch_npu.npu"] = package.npu
    return STATE


class _Loader(importlib.abc.Loader):
    """Builds the fake when `import torch_npu` runs, or fails the import (broken install)."""

    def __init__(self, knobs=None, error=None):
        self.knobs, self.error = knobs, error

    def create_module(self, spec):
        if self.error is not None:
            raise ImportError(self.error)
        STATE.env_at_import = {key: os.environ.get(key) for key in ENV_TO_RECORD}
        return _register(dict(self.knobs))

    def exec_module(self, module):
        sys.modules["torch_npu.npu"] = module.npu


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, loader):
        self.loader = loader

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch_npu":
            return None
        return importlib.machinery.ModuleSpec("torch_npu", self.loader, is_package=True)


def install_on_import(**knobs) -> FakeNpuState:
    """Make torch_npu importable without importing it: the fake is built when code under test imports it, and
    STATE.env_at_import records the environment at that moment."""
    sys.meta_path.insert(0, _Finder(_Loader(knobs=knobs)))
    return STATE


def install_broken(message="libascendcl.so: cannot open shared object file: No such file or directory") -> None:
    """Make torch_npu look installed (find_spec finds it) but fail to import, as without CANN's set_env.sh."""
    sys.meta_path.insert(0, _Finder(_Loader(error=message)))
