"""The machine the process runs on, read from the operating system: available memory, the process's peak resident
set, and the CPU model with the vector extensions that decide CPU kernel speed (benchmark headers name it: CPU figures
are only comparable on one CPU). Nothing here knows device types; devices.py asks these for its CPU rows."""

from __future__ import annotations

import os
import platform
import sys
from typing import Optional

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


__all__ = ["available_bytes", "cpu_description", "peak_rss_bytes"]
