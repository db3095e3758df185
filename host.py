"""The machine the process runs on, read from the operating system: available memory, the process's peak resident
set, and the CPU model with the vector extensions that decide CPU kernel speed (benchmark headers name it: CPU figures
are only comparable on one CPU), plus one measurement: the memory read bandwidth, which sets the floor of a batch-1
decode step (every weight read once), and the heap's freed pages handed back. Nothing here knows device types;
devices.py asks these for its CPU rows."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import time
from typing import Optional

import torch

_CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")


def _proc_bytes(path: str, key: str) -> Optional[int]:
    """The "key:  N kB" line of a /proc file in bytes (Linux); None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as lines:
            return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":")), None)
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> Optional[int]:
    """Memory the host can still give (MemAvailable, else sysconf); None when unknown."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    try:
        return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident set size (VmHWM, else ru_maxrss); None when unknown."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere). After building a
    large object from temporary copies (an ONNX graph's weights: about 60 MB of a global step graph's build), the
    freed memory otherwise stays in the process's resident set."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a libc without malloc_trim (musl)
        return


def cpu_description() -> str:
    """The CPU model, logical CPU count and the vector extensions that decide CPU kernel speed."""
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == (platform.processor() or "unknown CPU"):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = [flag for flag in _CPU_FLAGS_OF_INTEREST if flag in value.split()]
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {' '.join(flags) or 'no AVX2'}"


def cpu_model() -> str:
    """The CPU's model name alone (the first part of `cpu_description`), e.g. "AMD EPYC"."""
    return cpu_description().split(",")[0]


# The read-bandwidth probe streams a float32 buffer this large (8x the 32 MiB L3 a 2-vCPU EPYC VM reports, so caches
# cannot hold it) through torch.sum, BANDWIDTH_PROBE_RUNS times, and keeps the best pass.
BANDWIDTH_PROBE_BYTES, BANDWIDTH_PROBE_RUNS = 256 * 2**20, 6


@functools.lru_cache(maxsize=None)
def read_bandwidth(threads: int) -> float:
    """Measured memory read bandwidth in bytes/s with `threads` torch threads (about 0.2 s; cached per count).

    A sum over a buffer far larger than the caches does one add per 4 bytes read, so on any x86 CPU it is bound by
    memory, not arithmetic: the rate is what a batch-1 GEMV reading its weights once can reach at best.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(BANDWIDTH_PROBE_BYTES // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(BANDWIDTH_PROBE_RUNS + 1):  # the first pass warms up
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return BANDWIDTH_PROBE_BYTES / best


__all__ = ["available_bytes", "cpu_description", "cpu_model", "peak_rss_bytes", "read_bandwidth", "return_freed_memory"]
