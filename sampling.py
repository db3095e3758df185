"""Sampling of MOSS-TTS-Nano generation (spec tts.md §6.3), batched over rows that each have their own settings.

Upstream's order, per row: repetition penalty -> (greedy: argmax) -> temperature -> top-k -> top-p -> softmax ->
`torch.multinomial(probs, 1)`. torch's multinomial with one sample and no replacement is `argmax(probs / q)` with
`q = empty_like(probs).exponential_()` drawn over the whole [B, V] tensor (tests/test_sampling.py checks the two agree
bit for bit). The draw is therefore split in two:

* `draw_noise` takes the random numbers, outside any compiled or captured code: one call per request and decision,
  from that request's generator (the global one when it has none), in upstream's shapes ([B, 2] for the text
  decision, then [B, codebook] per audio channel). A request seeded like an upstream run consumes the same random
  numbers in the same order, and a request's numbers never depend on the other requests beside it.
* `sample_rows` is a pure function of logits, per-row settings and noise: no host sync, no branch on data, so it can
  be captured, and rows with different temperatures, top-k, top-p, penalties or greedy/sampled mix in one call.

Sampling runs in float32 whatever the model's dtype (in float32 models this is exactly upstream's arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .devices import device_spec


class SettingError(ValueError):
    """A bad generation setting. `name` is the argument (e.g. "audio_temperature"), so that the command line and the
    server can name their own flag or field without parsing the message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def validate_sampling_args(do_sample: bool, temperature: float, repetition_penalty: float = 1.0, name: str = "") -> None:
    """Check the user's sampling values once, before generation starts.

    Raises:
        SettingError: a temperature <= 0 with do_sample, or a repetition penalty <= 0.
    """
    if do_sample and not temperature > 0:
        raise SettingError(f"{name}temperature", f"{name}temperature must be > 0 when sampling, got {temperature}")
    if not repetition_penalty > 0:
        raise SettingError(f"{name}repetition_penalty",
                           f"{name}repetition_penalty must be > 0, got {repetition_penalty}")


@dataclass
class RowSettings:
    """Sampling settings of N rows as tensors, plus what the host knows about them (to skip unused steps).

    Attributes:
        do_sample: bool [N].
        temperature, top_p, repetition_penalty: float32 [N, 1] (top_p outside (0, 1) means no nucleus filter).
        top_k: long [N] (0 means no top-k filter).
        kth: long [N, 1], the column of each row's k-th best logit among the max_top_k best (0 where k is 0).
        top_k_on, top_p_on: bool [N, 1], where a row uses that filter.
        max_top_k: the largest top-k of the rows, clamped to the vocabulary (0: no row filters).
        any_sample, all_sample, any_top_p, all_top_p, all_top_k, same_top_k, any_penalty: what the rows use, for the
            host.
    """

    do_sample: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    kth: torch.Tensor
    top_k_on: torch.Tensor
    top_p_on: torch.Tensor
    max_top_k: int
    any_sample: bool
    all_sample: bool
    any_top_p: bool
    all_top_p: bool
    all_top_k: bool
    same_top_k: bool
    any_penalty: bool

    @classmethod
    def build(cls, rows: Sequence[tuple], vocab: int, device) -> "RowSettings":
        """Settings from per-row tuples (do_sample, temperature, top_k, top_p, repetition_penalty)."""
        table = SlotSettings(len(rows), vocab, device)
        for index, row in enumerate(rows):
            table.set(slice(index, index + 1), row)
        return table.rows(len(rows))


class SlotSettings:
    """The sampling settings of every slot, in persistent tensors written in place when a slot's group changes.

    A compiled or captured phase of the frame loop reads them at fixed addresses; `rows(n)` gives the RowSettings of
    slots [0, n) as views, with the host flags of those rows.

    Args:
        num_slots: S.
        vocab: the logits' width (top-k is clamped to it).
        device: of the tensors.
    """

    GREEDY = (False, 1.0, 0, 1.0, 1.0)

    def __init__(self, num_slots: int, vocab: int, device) -> None:
        self.vocab = vocab
        self.host = [self.GREEDY] * num_slots  # per slot: (do_sample, temperature, top_k, top_p, penalty), clamped

        def column(value, dtype=torch.float32):
            return torch.full((num_slots, 1), value, dtype=dtype, device=device)

        self.do_sample = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.temperature, self.top_p, self.penalty = column(1.0), column(1.0), column(1.0)
        self.kth, self.top_k_on, self.top_p_on = column(0, torch.long), column(False, torch.bool), column(False, torch.bool)

    def set(self, slots: slice, row: tuple) -> None:
        """Give slots `slots` the settings (do_sample, temperature, top_k, top_p, repetition_penalty)."""
        sample = bool(row[0])
        top_k = min(int(row[2]), self.vocab) if row[2] and row[2] > 0 else 0
        top_p = float(row[3]) if row[3] is not None else 1.0
        clamped = (sample, float(row[1]) if sample else 1.0, top_k, top_p, float(row[4]))  # greedy: T unused
        for slot in range(*slots.indices(len(self.host))):
            self.host[slot] = clamped
        for table, value in ((self.do_sample, sample), (self.temperature, clamped[1]), (self.top_k, top_k),
                             (self.top_p, top_p), (self.penalty, clamped[4]), (self.kth, max(top_k, 1) - 1),
                             (self.top_k_on, top_k > 0), (self.top_p_on, 0.0 < top_p < 1.0)):
            table[slots] = value

    def clear(self, slots: slice) -> None:
        """Slots `slots` no longer belong to anyone: give them GREEDY (top-k 0, so that no index they hold reaches past
        the live rows' top-k)."""
        self.set(slots, self.GREEDY)

    def rows(self, count: int, live: Sequence[bool] | None = None) -> RowSettings:
        """The RowSettings of slots [0, count) (views). `live`: per slot, whether it belongs to a request; the host
        flags, which choose the code paths, then follow the live slots only, so that a free slot's settings (GREEDY
        after `clear`) never choose the path (and so the exact-tie behaviour) of the requests beside it."""
        host = [row for index, row in enumerate(self.host[:count]) if live is None or live[index]]
        nucleus = [0.0 < row[3] < 1.0 for row in host]
        return RowSettings(
            do_sample=self.do_sample[:count], temperature=self.temperature[:count], top_k=self.top_k[:count],
            top_p=self.top_p[:count], repetition_penalty=self.penalty[:count], kth=self.kth[:count],
            top_k_on=self.top_k_on[:count], top_p_on=self.top_p_on[:count],
            max_top_k=max((row[2] for row in host), default=0), any_sample=any(row[0] for row in host),
            all_sample=all(row[0] for row in host), any_top_p=any(nucleus), all_top_p=all(nucleus),
            all_top_k=all(row[2] > 0 for row in host), same_top_k=len({row[2] for row in host}) <= 1,
            any_penalty=any(row[4] != 1.0 for row in host),
        )


# Rows that all have a top-k of at most this many tokens are filtered on their top-k candidates (`_filter_candidates`):
# about a tenth of the operations' width of a 1024-code row, and no full sort.
CANDIDATES_MAX = 128


def draw_noise(rows: int, vocab: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """float32 [rows, vocab] exponential(1) noise on `device`: the random numbers `torch.multinomial(probs, 1)` would
    draw from `generator` (None: the device's global generator). A generator on another device (devices.new_generator
    on a backend without generators) draws there and the numbers are moved."""
    where = generator.device if generator is not None else device
    noise = torch.empty(rows, vocab, dtype=torch.float32, device=where).exponential_(generator=generator)
    return noise if noise.device == torch.device(device) else noise.to(device)


def draw_channel_noise(channels: int, rows: int, vocab: int, generator: torch.Generator | None, device
                       ) -> torch.Tensor:
    """float32 [channels, rows, vocab]: `channels` consecutive `draw_noise(rows, vocab)` draws (upstream draws one
    [rows, vocab] per audio channel), in one call where the generator's device makes that the same numbers."""
    source = generator.device if generator is not None else torch.device(device)
    if device_spec(source).concatenating_draws:
        return draw_noise(channels * rows, vocab, generator, device).view(channels, rows, vocab)
    return torch.stack([draw_noise(rows, vocab, generator, device) for _ in range(channels)])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """Penalise every previously generated id once: a logit < 0 is multiplied by `penalty`, others divided by it.

    Args:
        logits: [N, V].
        seen: bool [N, V], True for ids generated earlier (each id counts once, like a unique set).
        penalty: > 0, a float or [N, 1]; 1.0 leaves a row unchanged.
    """
    penalised = torch.where(torch.signbit(logits), logits * penalty, logits / penalty)  # -0.0 gives -0.0 either way
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the logits >= the k-th largest of each row (ties may keep more than k); others become -inf; 0 keeps all."""
    if not top_k or top_k <= 0:
        return logits
    kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter with one p for every row (see `_nucleus`); a no-op outside 0 < p < 1."""
    if not 0.0 < top_p < 1.0:
        return logits
    return _nucleus(logits, torch.full((1, 1), float(top_p), device=logits.device), None)


def _top_k_rows(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Per row, keep the logits >= its k-th largest (ties may keep more than k); rows with k = 0 keep all."""
    best = torch.topk(logits, settings.max_top_k, dim=-1).values  # [N, max_top_k], descending
    threshold = best.gather(-1, settings.kth)
    drop = logits < threshold
    if not settings.all_top_k:
        drop &= settings.top_k_on
    return logits.masked_fill(drop, float("-inf"))


def _nucleus(logits: torch.Tensor, top_p: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """Per row, drop the tokens after the cumulative probability first exceeds p (rows where `active` [N, 1]).

    The drop mask is shifted right by one, so the token that crosses p is kept and the best token always stays.
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = torch.nn.functional.pad(cumulative[..., :-1] > top_p, (1, 0))
    if active is not None:
        drop_sorted &= active
    return logits.masked_fill(drop_sorted.scatter(-1, sorted_indices, drop_sorted), float("-inf"))


def _filter_candidates(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """Temperature, top-k and top-p of rows that all have a top-k, worked on their max_top_k best logits.

    The same numbers as dividing the whole row by the temperature, then `_top_k_rows` and `_nucleus`: dividing by a
    positive temperature keeps the order, so `topk` of the raw logits finds the same best values, already sorted; the
    nucleus softmax and cumsum of those values equal, bit for bit, the same functions over upstream's sorted row (its
    dropped logits are -inf and add exact zeros; tests/test_decoder.py compares the two paths). The kept values are
    scattered back into a row of -inf, so the final softmax sees upstream's filtered row. The one difference is an
    exact tie at the k-th value, which the whole-row filter keeps (more than k) and this one does not: hence float32
    logits only (a 16-bit row has many ties).
    """
    values, indices = torch.topk(logits, settings.max_top_k, dim=-1)  # [N, K], descending
    values = values / settings.temperature
    if not settings.same_top_k:  # rows with a smaller k drop their columns beyond it
        columns = torch.arange(settings.max_top_k, device=logits.device)
        values.masked_fill_(columns > settings.kth, float("-inf"))
    if settings.any_top_p:  # drop after the cumulative probability first exceeds p (the crossing token stays)
        drop = torch.softmax(values, dim=-1).cumsum(dim=-1)[..., :-1] > settings.top_p
        if not settings.all_top_p:
            drop &= settings.top_p_on
        values[..., 1:].masked_fill_(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


# The torch.profiler span around each call (measurement/frame_profile.py counts its time as the frame's sampling).
PROFILE_SPAN = "sampling"


def sample_rows(
    logits: torch.Tensor, settings: RowSettings, noise: torch.Tensor | None = None, seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row (spec §6.3), each row with its own settings.

    Args:
        logits: [N, V] raw logits.
        settings: the rows' RowSettings.
        noise: float32 [N, V] from `draw_noise` (rows that sample), or None when no row samples.
        seen: bool [N, V] repetition history, or None.

    Returns:
        long [N]: the (penalised) argmax for greedy rows, upstream's multinomial draw for sampled rows.
    """
    with torch.profiler.record_function(PROFILE_SPAN):
        return _sample_rows(logits, settings, noise, seen)


def filters_candidates(settings: RowSettings) -> bool:
    """Whether float32 rows with these settings are filtered on their top-k candidates (`_filter_candidates`): every
    row has a top-k, of at most CANDIDATES_MAX."""
    return settings.all_top_k and settings.max_top_k <= CANDIDATES_MAX


def _sample_rows(logits, settings, noise, seen) -> torch.Tensor:
    candidates = filters_candidates(settings) and logits.dtype == torch.float32
    logits = logits.float()
    if seen is not None and settings.any_penalty:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if noise is None or not settings.any_sample:
        return logits.argmax(dim=-1)
    if candidates:
        scaled = _filter_candidates(logits, settings)
    else:
        scaled = logits / settings.temperature
        if settings.max_top_k:
            scaled = _top_k_rows(scaled, settings)
        if settings.any_top_p:
            scaled = _nucleus(scaled, settings.top_p, None if settings.all_top_p else settings.top_p_on)
    sampled = (torch.softmax(scaled, dim=-1) / noise).argmax(dim=-1)
    if settings.all_sample:
        return sampled
    return torch.where(settings.do_sample, sampled, logits.argmax(dim=-1))


__all__ = [
    "RowSettings",
    "SettingError",
    "SlotSettings",
    "apply_repetition_penalty",
    "draw_channel_noise",
    "draw_noise",
    "filters_candidates",
    "sample_rows",
    "top_k_filter",
    "top_p_filter",
    "validate_sampling_args",
]
