"""Pure sampling functions of MOSS-TTS-Nano generation (spec tts.md §6.3).

The order of steps is upstream's `_sample_next_token`: repetition penalty -> (greedy: argmax) -> temperature ->
top-k -> top-p -> softmax -> `torch.multinomial(probs, 1)`. Each call of `sample_next_token` with `do_sample=True`
makes exactly one multinomial draw over [B, V] from the given generator (the global one by default), so a run seeded
with `torch.manual_seed` consumes random numbers in upstream's order. Probabilities are cast to float32 before the
draw (identity in fp32; required on NPU, whose multinomial rejects bf16).

Nothing here synchronises with the host: no `.item()`, no data-dependent Python branches.
"""

from __future__ import annotations

import torch


def validate_sampling_args(do_sample: bool, temperature: float, repetition_penalty: float = 1.0, name: str = "") -> None:
    """Check the user's sampling values once, before generation starts.

    Raises:
        ValueError: a temperature <= 0 with do_sample, or a repetition penalty <= 0.
    """
    if do_sample and not temperature > 0:
        raise ValueError(f"{name}temperature must be > 0 when sampling, got {temperature}")
    if not repetition_penalty > 0:
        raise ValueError(f"{name}repetition_penalty must be > 0, got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every previously generated id once: a logit < 0 is multiplied by `penalty`, others divided by it.

    Args:
        logits: [B, V].
        seen: bool [B, V], True for ids generated earlier in this call (each id counts once, like a unique set).
        penalty: > 0; 1.0 is a no-op.

    Returns:
        [B, V] penalised logits (a new tensor).
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the logits >= the k-th largest of each row (ties may keep more than k); others become -inf."""
    k = min(int(top_k), logits.shape[-1])
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the tokens after the cumulative probability first exceeds `top_p`.

    The drop mask is shifted right by one, so the token that crosses p is kept and the best token always stays.
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, sorted_indices, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row (spec §6.3).

    Args:
        logits: [B, V] raw logits.
        do_sample: False -> argmax of the (penalised) logits; True -> one multinomial draw.
        temperature: > 0 when sampling.
        top_k: keep the k best (0 = off).
        top_p: nucleus threshold, active only for 0 < p < 1.
        repetition_penalty: applied (also in greedy mode) where `seen` is True, when != 1.0.
        seen: bool [B, V] history mask, or None (no history).
        generator: explicit torch.Generator, or None for the global one.

    Returns:
        long [B]. Greedy ties pick the lowest index.
    """
    if seen is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and 0.0 < top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1).float()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = [
    "apply_repetition_penalty",
    "sample_next_token",
    "top_k_filter",
    "top_p_filter",
    "validate_sampling_args",
]
