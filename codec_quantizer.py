"""The residual LFQ quantizer of MOSS-Audio-Tokenizer-Nano (spec codec.md §2.3): 16 stages of 1024 codes, always fp32.

Encoding picks, stage by stage, the codebook row closest in cosine to the residual; decoding sums the stages' rows
through their output projections. Upstream's weight-normed 1x1 convolutions keep their state-dict keys
(`parametrizations.weight.original0/1`); `decode_tables` folds them once for a streaming session.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _conv1x1_weight(conv: nn.Conv1d) -> torch.Tensor:
    """[out, in] fp32 weight of a (weight-normed) 1x1 conv: W = g * v / ||v|| per output channel."""
    return conv.weight[:, :, 0].to(torch.float32)


def _weight_normed_conv(in_dim: int, out_dim: int) -> nn.Conv1d:
    # torch's parametrization keeps upstream's keys (parametrizations.weight.original0 = g, original1 = v), and its
    # load hook maps the legacy weight_g / weight_v names when loading through load_state_dict.
    return weight_norm(nn.Conv1d(in_dim, out_dim, kernel_size=1), dim=0)


def _to_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


class LFQStage(nn.Module):
    """One residual stage: in_proj (rvq_dim -> codebook_dim), codebook, out_proj (codebook_dim -> rvq_dim)."""

    def __init__(self, rvq_dim: int, codebook_dim: int, codebook_size: int):
        super().__init__()
        self.in_proj = _weight_normed_conv(rvq_dim, codebook_dim)
        self.out_proj = _weight_normed_conv(codebook_dim, rvq_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def nearest(self, latents: torch.Tensor) -> torch.Tensor:
        """Index of the best codebook row for latents [N, d]: highest cosine, written as the smallest squared
        distance between L2-normalised vectors (so the all-zero latent of a masked frame picks the row whose
        normalised squared norm rounds smallest, as upstream)."""
        z = F.normalize(latents, dim=-1)
        codes = F.normalize(self.codebook.weight.to(torch.float32), dim=-1)
        distance = z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1, keepdim=True).t()
        return (-distance).max(dim=1).indices


@dataclass
class QuantizerTables:
    """Folded decode weights, all fp32: codebooks [Q * K, d] (stage i's rows start at i * K), out_weight [Q, R, d],
    out_bias [Q, R], output_weight [O, R], output_bias [O]."""

    codebooks: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    output_weight: torch.Tensor
    output_bias: torch.Tensor


class ResidualLFQuantizer(nn.Module):
    """Residual LFQ (codec.md §2.3): input_proj 768->512, 16 stages of 1024 x 8 codes, output_proj 512->768."""

    def __init__(self, input_dim: int, rvq_dim: int, output_dim: int, num_quantizers: int, codebook_size: int,
                 codebook_dim: int, **training_only):
        super().__init__()
        self.input_proj = _weight_normed_conv(input_dim, rvq_dim)
        self.output_proj = _weight_normed_conv(rvq_dim, output_dim)
        self.quantizers = nn.ModuleList(
            LFQStage(rvq_dim, codebook_dim, codebook_size) for _ in range(num_quantizers)
        )

    def _apply(self, fn, recurse=True):
        # Keep the quantizer fp32 through model.to(dtype) / .half() / .bfloat16() (codec.md §8 item 3).
        super()._apply(fn, recurse)
        return super()._apply(_to_float32, recurse)

    @torch.no_grad()
    def encode(self, hidden: torch.Tensor, lengths: torch.Tensor, num_quantizers: int) -> torch.Tensor:
        """hidden [B, T, input_dim] -> codes [nq, B, T] (int64); frames >= lengths[b] get a zero residual."""
        hidden = hidden.to(torch.float32)
        mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None].to(hidden.device))[..., None]
        residual = F.linear(hidden, _conv1x1_weight(self.input_proj), _to_float32(self.input_proj.bias)) * mask
        codes = []
        for stage in self.quantizers[:num_quantizers]:
            latent = F.linear(residual, _conv1x1_weight(stage.in_proj), _to_float32(stage.in_proj.bias))
            index = stage.nearest(latent.reshape(-1, latent.shape[-1])).view(latent.shape[:-1])
            row = stage.codebook.weight.to(torch.float32)[index]  # the un-normalised row
            quantized = F.linear(row, _conv1x1_weight(stage.out_proj), _to_float32(stage.out_proj.bias))
            residual = residual - quantized * mask
            codes.append(index)
        return torch.stack(codes)

    @torch.no_grad()
    def decode_tables(self) -> QuantizerTables:
        """Fold the weight norms once (a decode session keeps them for its lifetime)."""
        return QuantizerTables(
            codebooks=torch.cat([_to_float32(stage.codebook.weight) for stage in self.quantizers]),
            out_weight=torch.stack([_conv1x1_weight(stage.out_proj) for stage in self.quantizers]),
            out_bias=torch.stack([_to_float32(stage.out_proj.bias) for stage in self.quantizers]),
            output_weight=_conv1x1_weight(self.output_proj),
            output_bias=_to_float32(self.output_proj.bias),
        )

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, tables: QuantizerTables | None = None,
               codebooks: torch.Tensor | None = None) -> torch.Tensor:
        """codes [nq, B, T] -> [B, T, output_dim] fp32: output_proj(sum_i out_proj_i(codebook_i[codes_i])).

        `codebooks` [B] (optional) limits row b to its first codebooks[b] stages; its other codes are ignored.
        """
        tables = tables or self.decode_tables()
        nq, batch, length = codes.shape
        stages, size = tables.out_weight.shape[0], tables.codebooks.shape[0] // tables.out_weight.shape[0]
        if not 1 <= nq <= stages:
            raise ValueError(f"got {nq} codebooks; expected 1..{stages}")
        used = None
        if codebooks is not None:  # [nq, B * T, 1]: stage i of row b counts iff i < codebooks[b]
            used = torch.arange(nq, device=codes.device)[:, None] < codebooks.to(codes.device)[None, :]
            used = used[:, :, None].expand(nq, batch, length).reshape(nq, batch * length, 1)
            codes = codes.clamp(0, size - 1)
        offsets = torch.arange(nq, device=codes.device)[:, None, None] * size  # stage i -> rows i*K ..
        rows = F.embedding(codes + offsets, tables.codebooks).view(nq, batch * length, -1)  # one gather
        per_stage = torch.baddbmm(tables.out_bias[:nq, None, :], rows, tables.out_weight[:nq].transpose(1, 2))
        if used is not None:
            per_stage = per_stage * used
        latent = per_stage.sum(dim=0)  # [B*T, R]
        out = F.linear(latent, tables.output_weight, tables.output_bias)
        return out.view(batch, length, -1)


__all__ = ["LFQStage", "QuantizerTables", "ResidualLFQuantizer"]
