"""The model flags the command lines share (infer_npu.py, serve.py and, through serve.py's flags, the Ray app): model
folder, verification, device, dtype, weight format, attention, progress; and loading the model they name, with
every choice checked before a weight is read and a missing or corrupt file reported with its remedy."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .. import devices, weight_formats, weights
from ..local_package import REPO_ROOT
from .command_line import UsageError
from .model_loading import AUTO_FORMAT, PLAIN_FORMAT, check_choices, load_model

# Files verified before loading (size + sha256); tests substitute pins of a tiny model.
PINS = weights.PINNED


def add_model_arguments(group) -> None:
    """The command-line flags of load_model's choices, shared by infer_npu.py and serve.py: model folder,
    verification, device, dtype, weight format, attention, progress output."""
    group.add_argument("--model-path", default=None,
                       help="model folder (default: this repository folder, filled by --download-only)")
    group.add_argument("--no-verify", action="store_true",
                       help="skip the size/sha256 check of the pinned files (for fine-tuned or custom checkpoints)")
    group.add_argument("--device", default="auto", help="auto | npu | cuda | cpu | npu:N | cuda:N")
    group.add_argument("--dtype", default="auto", type=str.lower, choices=("auto",) + devices.DTYPE_NAMES,
                       metavar="DTYPE",
                       help="auto | float32 | float16 | bfloat16 (auto: NPU float16, CUDA bfloat16 or float16 on GPUs "
                            "without native bf16, CPU float32)")
    group.add_argument("--weight-format", default="auto", type=str.lower,
                       choices=(AUTO_FORMAT, PLAIN_FORMAT) + weight_formats.WEIGHT_FORMATS,
                       help="how the weights are held after loading (weight_formats.py). auto: as --dtype gives "
                            "them, in float32 as fp32; plain: as --dtype gives them with torch's own Linear kernels "
                            "(upstream's exact arithmetic); fp32: float32 weights with the faster of F.linear and "
                            "oneDNN's packed linear on this CPU (a timing probe at load; greedy codes stay upstream's); "
                            "bf16 / fp16: 16-bit weights and activations (teacher-forced audio-logit cosine vs fp32 >= "
                            "0.999; on CPU, bf16 uses oneDNN's packed layout where it runs, fast with AVX-512 BF16); "
                            "int8: int8 weights, float32 activations, CPU only, fastest there (cosine >= 0.995). A "
                            "format other than auto and plain sets the dtype (int8: float32); a different explicit "
                            "--dtype is an error")
    group.add_argument("--attn-implementation", default="auto", choices=("auto",) + devices.ATTENTION_BACKENDS,
                       metavar="NAME",
                       help="auto | sdpa | eager | flash_attention_2 | npu_fusion_attention (one the device cannot "
                            "run falls back to the device default with a log line)")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress output: no bars (ours, transformers' weight loading, downloads) and, when "
                            "stderr is not a terminal, no periodic progress lines")


def model_folder(args) -> Path:
    """The folder of --model-path, or this repository's folder (filled by --download-only)."""
    return Path(args.model_path).resolve() if args.model_path else REPO_ROOT


def load_model_of_flags(args):
    """The model of the model flags, via model_loading.load_model; returns (model, device, dtype, attention). Every
    choice is checked before the weights are read; problems with the folder's files are reported with remedies."""
    with _model_file_errors(args) as folder:
        loaded = load_model(folder, args.device, args.dtype, args.weight_format, args.attn_implementation,
                            verify=not args.no_verify, pins=PINS, progress=not args.no_progress)
    return loaded.model, loaded.device, loaded.dtype, loaded.attention


def check_model_of_flags(args) -> None:
    """What load_model_of_flags checks before reading a weight (device, dtype, weight format, attention, the pinned
    files), with the same messages and remedies; serve.py runs it before it binds its port.

    Raises:
        UsageError, ValueError, weights.WeightsUnavailableError: as load_model_of_flags.
    """
    with _model_file_errors(args) as folder:
        check_choices(folder, args.device, args.dtype, args.weight_format, args.attn_implementation,
                      verify=not args.no_verify, pins=PINS, progress=not args.no_progress)


@contextlib.contextmanager
def _model_file_errors(args):
    """Yields the model folder; a missing or corrupt file becomes a message with its remedy."""
    folder = model_folder(args)
    download = "python infer_npu.py --download-only" + (f" --model-path {folder}" if args.model_path else "")
    try:
        yield folder
    except weights.WeightsUnavailableError as error:
        if args.no_verify:
            raise
        raise weights.WeightsUnavailableError(f"{error}\nOr run: {download}") from None
    except weights.ChecksumError as error:
        raise UsageError(
            f"{error}\nIf this is your own checkpoint (fine-tuned or converted), pass --no-verify to skip the check of "
            f"the pinned upstream files; if it should be the upstream release, fetch it again with: {download}"
        ) from None


__all__ = ["PINS", "add_model_arguments", "check_model_of_flags", "load_model_of_flags", "model_folder"]
