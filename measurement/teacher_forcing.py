"""Teacher forcing: the logits generation would compute at each frame, with given frames fed in as its choices, and the
metrics that compare two such runs.

Sampling makes two runs of the model differ, so numerical checks compare teacher-forced passes instead: the same
prompt rows and the same frames (e.g. a reference's greedy output) go through two models (another device, dtype,
attention backend or weight format), and their global hidden states, stop logits and audio logits are compared.
`verify_npu.py` judges every device x dtype x backend this way against CPU float32 eager, the weight formats are
judged against fp32 (tests/test_weight_formats.py), and the tests of both use these functions.

One pass, no cache, no sampling (spec tts.md §6.2): the global decoder runs once over prompt + frame rows, and the row
before frame f predicts it; the local decoder is causal, so one pass over the 1 + n_vq slots of each frame
[global hidden, wte(slot 9), audio_embeddings[c](code c) ...] gives the stop decision (slot 0) and every channel's
logits (audio head c reads slot c + 1) at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Size of the top-k sets whose overlap head_metrics reports.
TOP_K_OVERLAP = 5


@dataclass
class TeacherForcedLogits:
    """The outputs of `teacher_forced`, all float32 on the model's device.

    Attributes:
        hidden: [B, T + F, C] global hidden states after ln_f.
        text: [B, F + 1, 2] logits of (continue = audio_assistant_slot, stop = audio_end) at each text decision; the
            last one is the decision after the final frame.
        audio: [B, F, n_vq, codebook] logits of every audio head at every frame.
    """

    hidden: torch.Tensor
    text: torch.Tensor
    audio: torch.Tensor

    def cpu(self) -> "TeacherForcedLogits":
        return TeacherForcedLogits(self.hidden.cpu(), self.text.cpu(), self.audio.cpu())


@torch.no_grad()
def teacher_forced(model, input_ids: torch.Tensor, frames: torch.Tensor, attention="eager") -> TeacherForcedLogits:
    """Run a MossTTSNanoForCausalLM (any dtype or weight format) teacher-forced over prompt rows and frames.

    Args:
        model: the model on its device.
        input_ids: long [B, T, 1 + n_vq] prompt rows on the model's device, all valid (no padding).
        frames: long [B, F, n_vq] audio codes to feed, on the model's device.
        attention: a key of gpt2_decoder.ATTENTION_FUNCTIONS or a function with its signature (tests pass a broken
            one), used by both decoders; the eager reference by default.

    Returns:
        TeacherForcedLogits.
    """
    config = model.config
    batch, count, n_vq = frames.shape
    slot = torch.full_like(frames[..., :1], config.audio_assistant_slot_token_id)
    rows = torch.cat((input_ids, torch.cat((slot, frames), dim=-1)), dim=1)  # [B, T + F, 1 + n_vq]
    hidden, _ = model.transformer(model._embed_rows(rows), None, None, attention)  # [B, T + F, C]
    anchors = hidden[:, input_ids.shape[1] - 1:]  # [B, F + 1, C]: the row before each decision
    local_dtype = model.local_transformer.ln_f.weight.dtype
    slots = hidden.new_zeros(batch, count + 1, n_vq + 1, hidden.shape[-1], dtype=local_dtype)
    slots[:, :, 0] = anchors.to(local_dtype)
    slots[:, :, 1] = model.transformer.wte.weight[config.audio_assistant_slot_token_id].to(local_dtype)
    for channel in range(n_vq - 1):  # the last channel's embedding is never an input
        slots[:, :count, channel + 2] = model.audio_embeddings[channel](frames[..., channel]).to(local_dtype)
    local, _ = model.local_transformer(slots.flatten(0, 1), None, None, attention)  # [B * (F + 1), 1 + n_vq, C]
    local = local.unflatten(0, (batch, count + 1))
    candidates = torch.tensor([config.audio_assistant_slot_token_id, config.audio_end_token_id], device=rows.device)
    text = nn.functional.linear(local[:, :, 0], model.text_lm_head.weight[candidates].to(local_dtype))
    audio = torch.stack([head(local[:, :count, c + 1]).float() for c, head in enumerate(model.audio_lm_heads)], dim=2)
    return TeacherForcedLogits(hidden.float(), text.float(), audio)


# ----------------------------------------------------------------------------------------------------------------
# Metrics: `reference` first, the run being judged second.


def compare(reference: TeacherForcedLogits, other: TeacherForcedLogits) -> dict:
    """hidden_metrics, stop_metrics and audio_metrics of two teacher-forced runs (the batch rows pooled)."""
    return {"hidden": hidden_metrics(reference.hidden.flatten(0, 1), other.hidden.flatten(0, 1)),
            "stop": stop_metrics(reference.text.flatten(0, 1), other.text.flatten(0, 1)),
            "audio": audio_metrics(reference.audio.flatten(0, 1), other.audio.flatten(0, 1))}


def _cosines(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cosine of each row (last dim) in float64; rows that are exactly zero in the reference are left out."""
    reference, other = reference.double(), other.double()
    keep = reference.norm(dim=-1) > 0
    return nn.functional.cosine_similarity(reference[keep], other[keep], dim=-1, eps=1e-30)


def hidden_metrics(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Hidden states [P, C]: max abs error, relative (Frobenius) error, worst and mean per-position cosine."""
    error = other.double() - reference.double()
    cosines = _cosines(reference, other)
    return {"max_abs_error": float(error.abs().max()), "rel_error": float(error.norm() / reference.double().norm()),
            "cosine_min": float(cosines.min()), "cosine_mean": float(cosines.mean())}


def head_metrics(reference: torch.Tensor, other: torch.Tensor, k: int = TOP_K_OVERLAP) -> dict:
    """One head's logits [F, V]: worst per-frame cosine, top-1 agreement and mean top-k overlap over frames."""
    top1 = (reference.argmax(-1) == other.argmax(-1)).double()
    reference_top, other_top = reference.topk(k, dim=-1).indices, other.topk(k, dim=-1).indices
    overlap = (reference_top[:, :, None] == other_top[:, None, :]).any(-1).double().sum(-1) / k
    return {"cosine_min": float(_cosines(reference, other).min()), "top1": float(top1.mean()),
            "top5": float(overlap.mean())}


def audio_metrics(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Every audio head [F, n_vq, V]: the worst cosine, mean top-1/top-5 over every (frame, head), per-head details."""
    per_head = [head_metrics(reference[:, c], other[:, c]) for c in range(reference.shape[1])]
    worst = min(range(len(per_head)), key=lambda c: per_head[c]["cosine_min"])
    return {"cosine_min": per_head[worst]["cosine_min"], "worst_head": worst,
            "top1": sum(h["top1"] for h in per_head) / len(per_head),
            "top5": sum(h["top5"] for h in per_head) / len(per_head), "per_head": per_head}


def stop_decisions(text_logits: torch.Tensor) -> torch.Tensor:
    """0 = continue (id 9), 1 = stop (id 7) per position of [P, 2] logits; a tie continues, as generation does."""
    return (text_logits[:, 1] > text_logits[:, 0]).long()


def stop_metrics(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Stop logits [P, 2] of (9, 7): share of equal decisions, max error of the margin logit(9) - logit(7)."""
    reference_margin = reference[:, 0].double() - reference[:, 1].double()
    margin_error = (other[:, 0].double() - other[:, 1].double() - reference_margin).abs()
    agree = (stop_decisions(reference) == stop_decisions(other)).double()
    return {"agree": float(agree.mean()), "margin_max_abs_error": float(margin_error.max()),
            "reference_margin_min_abs": float(reference_margin.abs().min())}


def reproduces_greedy(forced: TeacherForcedLogits, codes: torch.Tensor, requested: int) -> bool:
    """Whether teacher forcing reproduces a greedy run of one prompt: its codes [F, n_vq], continuing every frame and,
    when it made fewer than `requested` frames, stopping after the last (the check a verifier runs on itself)."""
    audio_ok = torch.equal(forced.audio[0].argmax(-1), codes)
    decisions = stop_decisions(forced.text[0])
    stop_ok = bool((decisions[:-1] == 0).all()) and (codes.shape[0] == requested or int(decisions[-1]) == 1)
    return audio_ok and stop_ok


__all__ = ["TOP_K_OVERLAP", "TeacherForcedLogits", "audio_metrics", "compare", "head_metrics", "hidden_metrics",
           "reproduces_greedy", "stop_decisions", "stop_metrics", "teacher_forced"]
