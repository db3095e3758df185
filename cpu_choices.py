"""Kernel decisions of the CPU timing probes, remembered per CPU model so that one machine always runs the same kernels.

A timing probe on a shared or busy host can land on either side of its margin: two identical runs once chose
different fp32 kernels. The first decision taken on a machine (key: CPU model, torch version, thread count) is
written to a small JSON file and every later load reads it back, with the probe's figures and the file named in the
reason it logs. The file lives in $MOSS_TTS_NANO_CACHE_DIR, else $XDG_CACHE_HOME/moss_tts_nano, else
~/.cache/moss_tts_nano; delete it (or point the variable elsewhere) to probe again. A file that cannot be read or
written only costs a fresh probe (logged once), never a failure.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from .host import cpu_model

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "MOSS_TTS_NANO_CACHE_DIR"
CHOICES_FILE = "cpu_kernel_choices.json"


def choices_path() -> Path:
    """Where the decisions are kept (see the module docstring)."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "moss_tts_nano")
    return Path(folder) / CHOICES_FILE


def machine_key() -> str:
    """What a decision holds for: the CPU model, torch's version and its thread count."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def remembered(name: str, probe: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(choice, why) of decision `name` on this machine: the stored one, else `probe()`'s, which is then stored."""
    path, key = choices_path(), machine_key()
    table = _read(path)
    stored = table.get(key, {}).get(name)
    if isinstance(stored, list) and len(stored) == 2:
        return stored[0], f"{stored[1]}; remembered for this CPU in {path}"
    choice, why = probe()
    table.setdefault(key, {})[name] = [choice, why]
    _write(path, table)
    return choice, why


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.info("kernel choices in %s not readable (%s); probing again", path, error)
        return {}
    return table if isinstance(table, dict) else {}


def _write(path: Path, table: dict) -> None:
    """Write atomically (a temporary file renamed), so that two processes never leave half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(table, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        logger.info("kernel choices not stored in %s (%s); the next load probes again", path, error)


__all__ = ["CACHE_DIR_ENV", "choices_path", "machine_key", "remembered"]
