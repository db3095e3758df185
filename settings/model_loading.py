"""Loading the TTS model for a run, with every choice checked before a weight is read (the command-line flags that
make those choices are model_flags.py).

    device (devices.resolve_device) -> dtype (the weight format's, or the requested one) -> attention backend
    -> the folder's files (size + sha256 of the pinned upstream files, weights.py) -> from_pretrained
    -> placed on the device -> weight format (weight_formats.apply_weight_format, last, as it requires)

Messages name the parameters (`dtype=...`, `weight_format=...`); the command lines translate them into their flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import devices, weight_formats, weights

# weight_format "auto": the dtype as given, and in float32 the fp32 format (the faster float32 kernel of this CPU).
AUTO_FORMAT = "auto"
# weight_format "plain": the dtype as given with torch's own nn.Linear (upstream's exact kernels; no conversion).
PLAIN_FORMAT = "plain"


@dataclass
class LoadedModel:
    """A model ready to generate, and the choices it was loaded with."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    attention: str


def resolve_run_dtype(device, dtype: str = "auto", weight_format: str = AUTO_FORMAT) -> torch.dtype:
    """The dtype a run computes in: `dtype` on the device (its default for "auto"), or the dtype of an explicit
    weight format (int8: float32).

    Raises:
        ValueError: an unknown or unsupported dtype or format, a format the device cannot run, or an explicit dtype
            other than the format's.
    """
    resolved = devices.resolve_dtype(device, dtype)
    if weight_format in (AUTO_FORMAT, PLAIN_FORMAT):
        return resolved
    reason = weight_formats.format_unavailable_reason(device, weight_format)
    if reason is not None:
        raise ValueError(reason)
    fmt = weight_formats.normalize_weight_format(weight_format)
    format_dtype = weight_formats.FORMAT_DTYPES[fmt]
    if str(dtype).strip().lower() != "auto" and resolved != format_dtype:
        raise ValueError(f"dtype={dtype} conflicts with weight_format={fmt}, which runs in "
                         f"{devices.dtype_name(format_dtype)}; pass only one of them (or dtype=auto)")
    return format_dtype


def check_model_folder(folder, verify: bool = True, pins: Sequence[weights.PinnedFile] = weights.PINNED,
                       progress: bool = True) -> None:
    """Check a model folder before loading it: the size and sha256 of every pinned file (weights.ensure_model_files,
    which never modifies the folder), or with `verify=False` (fine-tuned or converted checkpoints) only that it holds
    a config.json.

    Raises:
        weights.WeightsUnavailableError: files are missing (the message lists them and how to get them).
        weights.ChecksumError: a file differs from its pin.
    """
    folder = Path(folder)
    if verify:
        weights.ensure_model_files(model_path=folder, pins=pins, progress=progress)
    elif not (folder / "config.json").is_file():
        raise weights.WeightsUnavailableError(
            f"{folder} has no config.json; expected a model folder.\n" + weights.describe_manual_download(folder))


def load_model(folder, device: str = "auto", dtype: str = "auto", weight_format: str = AUTO_FORMAT,
               attn_implementation: str = "auto", verify: bool = True,
               pins: Sequence[weights.PinnedFile] = weights.PINNED, progress: bool = True) -> LoadedModel:
    """The model of `folder` on the resolved device, dtype and attention backend, in `weight_format`.

    Args:
        folder: a model folder (as `python infer_npu.py --download-only` fills it).
        device, dtype, attn_implementation: requests for devices.py ("auto": the device's defaults).
        weight_format: "auto" (`dtype`; in float32 the fp32 format), "plain" (`dtype`, torch's nn.Linear) or a name
            weight_formats.normalize_weight_format accepts.
        verify, pins, progress: see check_model_folder.

    Raises:
        ValueError: a choice the device cannot run, or conflicting choices (before any file is read).
        weights.WeightsUnavailableError, weights.ChecksumError: see check_model_folder.
    """
    from ..modeling_moss_tts_nano import MossTTSNanoForCausalLM  # here: the checks below run before transformers loads

    resolved_device, run_dtype, attention = check_choices(folder, device, dtype, weight_format, attn_implementation,
                                                          verify, pins, progress)
    model = MossTTSNanoForCausalLM.from_pretrained(str(folder))
    model._set_attention_implementation(attention)
    model.to(device=resolved_device, dtype=run_dtype).eval()
    applied = effective_weight_format(weight_format, run_dtype)
    if applied is not None:
        weight_formats.apply_weight_format(model, applied)
    # The dtype the formatted model computes in: bf16 on a CPU without oneDNN's bf16 packing keeps bf16 weights in a
    # float32 model (weight_formats.compute_dtype), and a summary naming bfloat16 there would misreport the run.
    return LoadedModel(model, resolved_device, model.transformer.ln_f.weight.dtype, attention)


def check_choices(folder, device: str = "auto", dtype: str = "auto", weight_format: str = AUTO_FORMAT,
                  attn_implementation: str = "auto", verify: bool = True,
                  pins: Sequence[weights.PinnedFile] = weights.PINNED, progress: bool = True) -> tuple:
    """Everything load_model checks before it reads a weight (serve.py runs it before it binds its port); returns the
    resolved (device, dtype, attention).

    Raises:
        as load_model.
    """
    resolved_device = devices.resolve_device(device)
    run_dtype = resolve_run_dtype(resolved_device, dtype, weight_format)
    attention = devices.resolve_attention(attn_implementation, resolved_device, run_dtype)
    check_model_folder(folder, verify, pins, progress)
    return resolved_device, run_dtype, attention


def effective_weight_format(requested: str, dtype: torch.dtype) -> str | None:
    """The weight format a load applies: the one asked for; auto in float32 -> fp32 (its fastest kernel); auto in
    16 bits and plain -> none (a plain cast)."""
    if requested == PLAIN_FORMAT or (requested == AUTO_FORMAT and dtype != torch.float32):
        return None
    return "fp32" if requested == AUTO_FORMAT else requested


__all__ = ["AUTO_FORMAT", "PLAIN_FORMAT", "LoadedModel", "check_model_folder",
           "effective_weight_format", "load_model", "resolve_run_dtype"]
