"""Keys and values of prompt prefixes that repeat: a voice's rows, prefilled once and copied into a slot after that.

A voice-clone prompt starts with rows that depend only on the reference voice (the template head, the reference
codes, the template between reference and text: `prompting.shared_prefix_rows`): 73-96% of each chunk's rows for a
reference of a few seconds. The engine prefills such a prompt in two parts, the shared prefix and then the rest attending to
it, and keeps the prefix's keys and values here, keyed by the prefix rows themselves. The next chunk or request in
the same voice copies them into its slot and prefills only the rest.

Outputs with a stored prefix equal those of a first (cold) prefill bit for bit, in every weight format: both run
the same two calls, the prefix alone and then the rest; only where the prefix's keys come from differs. Against one
whole-prompt prefill (upstream's `generate`) they differ by float rounding (about 2e-6 in float32), because a matrix
product's rounding depends on how many rows it multiplies at once; callers that must match upstream exactly (the
CLI, `inference_stream`) run without a store and prefill whole prompts.

Entries are dropped least recently used first to keep the store within its byte budget.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 256 * 2**20  # about 18 ten-second voices of the released model in float32


@dataclass
class StoredPrefix:
    """One prefix: its rows (to confirm a hash match) and per layer its keys and values [H, P, D]."""

    rows: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys + self.values)


class PrefixStore:
    """Stored prefixes within `budget_bytes`, least recently used dropped first; counts hits and misses.

    Args:
        budget_bytes: the most the stored keys and values may hold (>= 0; 0 stores nothing, while the caller still
            prefills in two parts, so its outputs equal those under any budget).
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"prefix store budget_bytes={budget_bytes}; expected >= 0")
        self.budget_bytes = budget_bytes
        self.hits = 0
        self.misses = 0
        self.nbytes = 0  # what the stored keys and values hold (kept as a count: /metrics reads it from any thread)
        self._entries: OrderedDict[bytes, StoredPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, rows: torch.Tensor) -> bool:
        """Whether a prefix of exactly these rows is stored (counts nothing, moves nothing)."""
        entry = self._entries.get(_key(rows))
        return entry is not None and torch.equal(entry.rows, rows.cpu())

    def find(self, rows: torch.Tensor) -> Optional[StoredPrefix]:
        """The stored prefix of exactly these rows (and count a hit), or None (and count a miss)."""
        key = _key(rows)
        entry = self._entries.get(key)
        if entry is not None and torch.equal(entry.rows, rows.cpu()):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def add(self, rows: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep copies of `keys` and `values` (per layer [H, P, D]) for `rows` [P, W], if they fit the budget and are
        finite (a prefix that went non-finite, e.g. on a device fault, is computed again next time, never served)."""
        if _nbytes(keys + values) > self.budget_bytes:
            return
        if not bool(torch.stack([tensor.isfinite().all() for tensor in keys + values]).all()):  # one host sync
            return
        entry = StoredPrefix(rows.detach().cpu().clone(), [k.clone() for k in keys], [v.clone() for v in values])
        key = _key(rows)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        while self._entries and self.nbytes + entry.nbytes > self.budget_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        logger.debug("prefix store: %d rows stored (%d prefixes, %.1f MiB)", rows.shape[0], len(self._entries),
                     self.nbytes / 2**20)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _key(rows: torch.Tensor) -> bytes:
    contiguous = rows.detach().cpu().contiguous()
    digest = hashlib.blake2b(contiguous.numpy().tobytes(), digest_size=16)
    digest.update(str(tuple(contiguous.shape)).encode())
    return digest.digest()


__all__ = ["DEFAULT_BUDGET_BYTES", "PrefixStore", "StoredPrefix"]
