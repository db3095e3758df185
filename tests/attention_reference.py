"""Eager attention and the model's mask shapes, for checking attention backends in tests.

The mask convention is the project's: bool, True = attend, broadcastable to [B, 1, T_q, T_k]. Masks are causal with
key padding; a padded query keeps its own (diagonal) key so no row is fully masked, as gpt2_decoder's builder does.
"""

import torch


def eager_attention(query, key, value, mask, scaling):
    """softmax(q kᵀ · scaling, masked) · v in the inputs' dtype. q [B, H, T_q, D], k/v [B, H, T_k, D]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def padded_causal_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, 1, T_q, T_k] mask for the last T_q of T_k positions; `valid` is [B, T_k] bool (False = left padding)."""
    k_len = valid.shape[1]
    query_pos = torch.arange(k_len - q_len, k_len)
    keys = torch.arange(k_len)
    causal = keys[None, :] <= query_pos[:, None]  # [T_q, T_k], aligned bottom-right
    mask = causal[None] & valid[:, None, :]  # [B, T_q, T_k]
    diagonal = keys[None, :] == query_pos[:, None]
    padded_query = ~valid[:, query_pos]  # [B, T_q]
    return (mask | (diagonal[None] & padded_query[:, :, None]))[:, None]


def random_qkv(batch, heads, q_len, k_len, head_dim=16, dtype=torch.float32, seed=0):
    """Deterministic q [B, H, T_q, D] and k, v [B, H, T_k, D]."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda length: torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)  # noqa: E731
    return make(q_len), make(k_len), make(k_len)
