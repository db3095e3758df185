"""Cross-device numerical verification of MOSS-TTS-Nano: does this device run the model correctly?

    python verify_npu.py --model-path DIR            # real weights (folder as weights.py lays it out)
    python verify_npu.py --tiny                      # small random model + codec, runs anywhere
    python verify_npu.py --tiny --devices cpu --dtypes float32,bfloat16 --attn eager,sdpa
    python verify_npu.py --model-path DIR --devices npu --dtypes float16,bfloat16 --output-dir out/
    python verify_npu.py --tiny --devices cpu --weight-formats bf16,int8   # + load-time weight formats

Each row (device x dtype x attention backend, or device x weight format x attention with --weight-formats) is compared
with a reference run on the CPU in float32 with the eager attention: a teacher-forced pass (hidden states, stop logits,
audio logits), greedy generation streamed through the codec, NaN/Inf checks and the codec on the device. What is
measured, and the ONE table of tolerances, live in measurement/verification.py; this script plans the rows from its arguments,
prints one table (PASS / FAIL / SKIP per row, with the failing metric), writes `npu_verification_report.json` and one
wav per row (the row's greedy frames, for listening) to --output-dir, and exits 0 only when every row passes (1: a row
failed; 3: nothing failed but some row could not run, SKIP; 2: bad arguments). A weight format the device cannot run
(int8 off the CPU, bf16 on an Ascend 910A) is a SKIP row with the reason.

This script never names a device type: the --devices strings go to devices.py, which owns torch_npu.
"""

if __name__ == "__main__" and not __package__:
    # Run as a script: import this file as part of the repository package so that its relative imports work.
    from local_package import import_module

    raise SystemExit(import_module("verify_npu").main())

import argparse
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from . import devices, weight_formats
from .measurement import verification
from .audio_io import save_audio
from .gpt2_decoder import ATTENTION_FUNCTIONS
from .measurement.verification import AUTO, REFERENCE, TOLERANCES, Assets, Reference, Row, short_number

REPORT_NAME = "npu_verification_report.json"
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
# Under outputs/, like infer_npu.py's default, so that a run in the repository folder leaves git clean.
DEFAULT_OUTPUT_DIR = "outputs/verify_npu"
DEFAULT_TEXT = "Hello world. This is a short verification sentence."
DEFAULT_FRAMES = 16


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Verify MOSS-TTS-Nano numerically on a device against CPU fp32.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", help="folder with pytorch_model.bin, tokenizer.model, audio_tokenizer/")
    source.add_argument("--tiny", action="store_true", help="a small random model and codec (no weights needed)")
    parser.add_argument("--devices", default="auto", help="comma list passed to devices.py: auto, cpu, e.g. npu:0")
    parser.add_argument("--dtypes", default="auto",
                        help="comma list of float32, bfloat16, float16; auto = every dtype the device supports")
    parser.add_argument("--attn", default="eager,sdpa,auto",
                        help="comma list of attention backends (eager, sdpa, flash_attention_2, "
                             "npu_fusion_attention, auto = the device default)")
    parser.add_argument("--weight-formats", default="",
                        help="comma list of weight formats (weight_formats.py: fp32, bf16, fp16, int8) to verify as "
                             "extra rows, device x format x attention, e.g. bf16,int8 (default: none)")
    parser.add_argument("--prompt-audio-path", default=None, help="reference voice (default: a synthetic tone)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="text to speak")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="greedy frames to generate (80 ms each)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="where the report and wavs go (default: outputs/verify_npu, which git ignores)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --tiny weights and the synthetic prompt")
    return parser


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    return list(dict.fromkeys(entries))


def check_request(args, table: Mapping[str, Callable]) -> None:
    """Reject malformed options before any work (ValueError naming the bad value)."""
    if args.frames < 1:
        raise ValueError(f"--frames {args.frames}: expected a positive number of frames")
    for name in split_list(args.dtypes):
        if name != AUTO and name.lower() not in devices.DTYPES_BY_NAME:
            raise ValueError(f"--dtypes: unknown dtype {name!r}; expected 'auto' or one of "
                             f"{sorted(devices.DTYPES_BY_NAME)}")
    for name in split_list(args.attn):
        if name != AUTO and name not in table:
            raise ValueError(f"--attn: unknown attention {name!r}; expected 'auto' or one of {sorted(table)}")
    for name in split_list(args.weight_formats):
        weight_formats.normalize_weight_format(name)  # ValueError naming an unknown format
    if not split_list(args.devices) or not split_list(args.dtypes) or not split_list(args.attn):
        raise ValueError("--devices, --dtypes and --attn each need at least one entry")


def plan_rows(args) -> list[Row]:
    """The rows the arguments ask for (verification.plan_rows over the comma lists)."""
    return verification.plan_rows(split_list(args.devices), split_list(args.dtypes), split_list(args.attn),
                                  split_list(args.weight_formats))


def reset_peak_rss() -> None:
    """Start a new CPU peak-RSS window (devices.peak_memory_bytes on CPU) by writing "5" to /proc/self/clear_refs
    (Linux); elsewhere the CPU peak stays the process's lifetime peak. Process-wide state, so the script does it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Output: table, JSON report, wavs
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = ("device", "dtype", "attn", "status", "load s", "hid cos", "hid rel", "stop", "top1", "top5", "greedy",
           "codec dB", "stream dB", "LM fr/s", "codec ms", "RTF", "TTFA s", "peak MB", "failing metric / reason")


def _cosine_cell(value: Optional[float]) -> str:
    """Cosines near 1 are unreadable as 0.99999...: show 1 - cosine instead, as '1-2.1e-06'."""
    if value is None:
        return "-"
    gap = 1.0 - value
    return "1" if gap <= 0 else f"1-{gap:.1e}"


def table_cells(row: Row) -> list[str]:
    """The table cells of one row, in COLUMNS order."""
    m = row.metrics
    if not m.get("hidden"):
        return [row.device, row.label, row.attention, row.status] + ["-"] * (len(COLUMNS) - 5) + [row.reason]
    timings, codec = m["timings"], m["codec"]
    peak = m.get("peak_memory_bytes")
    greedy = f"{m['greedy']['match']:.2f}"
    if m["greedy"]["first_divergence"] is not None:
        greedy += f"@{m['greedy']['first_divergence']}"
    numbers = [m["load_s"], m["hidden"]["cosine_min"], m["hidden"]["rel_error"], m["stop"]["agree"], m["audio"]["top1"],
               m["audio"]["top5"], greedy, codec["decode_snr_db"], codec["stream_vs_offline_snr_db"],
               timings["lm_frames_per_s"], timings["codec_ms_per_frame"], timings["rtf"],
               timings["time_to_first_audio_s"]]
    cells = [short_number(value) for value in numbers]
    cells[1] = _cosine_cell(m["hidden"]["cosine_min"])
    return [row.device, row.label, row.attention, row.status, *cells,
            "-" if peak is None else f"{peak / 2**20:.0f}", "; ".join(row.failures) or row.reason]


def render_table(rows: list[Row]) -> str:
    """Fixed-width text table with one line per row."""
    cells = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def render_environment(environment: dict) -> str:
    """The environment section: versions, then each device with its defaults, then the NPU env vars."""
    lines = [f"torch {environment['torch']}  transformers {environment['transformers']}  "
             f"python {environment['python']}  CANN {environment['cann'] or 'not found'}"]
    for facts in environment["devices"]:
        if not facts["available"]:
            lines.append(f"device {facts['requested']}: not available ({facts['reason']})")
            continue
        package = facts["backend_package"]
        package_text = f"  backend {package['name']} {package['version']}" if package else ""
        toolkit = f"  toolkit {facts['toolkit']}" if facts["toolkit"] else ""
        lines.append(f"device {facts['device']}: {facts['name']}{package_text}{toolkit}  "
                     f"memory free {_gib(facts['free_memory_bytes'])} / total {_gib(facts['total_memory_bytes'])}  "
                     f"default dtype {facts['default_dtype']}  attention {facts['default_attention']}  "
                     f"supports {','.join(facts['supported_dtypes'])}")
    env = ", ".join(f"{name}={value if value is not None else '(unset)'}"
                    for name, value in environment["env"].items())
    lines.append(f"env: {env}")
    if environment["env_applied_by_this_script"]:
        lines.append(f"env applied by this script (devices.apply_recommended_env): "
                     f"{environment['env_applied_by_this_script']}")
    return "\n".join(lines)


def _gib(value: Optional[int]) -> str:
    return "?" if value is None else f"{value / 2**30:.1f} GiB"


def _jsonable(value):
    """Report values as strict JSON: non-finite floats become strings, tensors lists, dataclasses dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items() if not str(key).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def build_report(args, environment: dict, assets: Optional[Assets], reference: Optional[Reference],
                 rows: list[Row], verdict: str, exit_code: int) -> dict:
    """The full JSON report."""
    return _jsonable({
        "verdict": verdict, "exit_code": exit_code,
        "request": {key: value for key, value in vars(args).items()},
        "model": None if assets is None else {"source": assets.source, "read_s": assets.read_seconds,
                                              "text": assets.text, "prompt_samples": assets.prompt_audio.shape[-1]},
        "environment": environment,
        "tolerances": {name: asdict(tolerance) for name, tolerance in TOLERANCES.items()},
        "reference": None if reference is None else reference.summary,
        "rows": [{"device": row.device, "dtype": row.dtype, "weight_format": row.weight_format,
                  "attention": row.attention, "status": row.status,
                  "failures": row.failures, "reason": row.reason, "metrics": row.metrics} for row in rows],
    })


def save_wavs(out_dir: Path, rows: list[Row], reference_audio: Optional[torch.Tensor], sample_rate: int) -> None:
    """One wav per row (its greedy frames, streamed) plus the reference, under out_dir/wavs/."""
    folder = out_dir / "wavs"
    folder.mkdir(parents=True, exist_ok=True)
    named = [("reference_" + "_".join(REFERENCE), reference_audio)]
    named += [(f"{row.device}_{row.label}_{row.attention}", row.metrics.get("_audio")) for row in rows]
    for name, audio in named:
        if audio is not None and audio.numel():
            save_audio(folder / (re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".wav"), audio, sample_rate)


# ---------------------------------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------------------------------
def verdict_of(rows: list[Row]) -> tuple[str, int]:
    """(verdict, exit code): PASS/0 when every row passes, FAIL/1 when one fails, INCOMPLETE/3 otherwise."""
    statuses = {row.status for row in rows}
    if "FAIL" in statuses:
        return "FAIL", EXIT_FAIL
    if statuses != {"PASS"}:
        return "INCOMPLETE", EXIT_INCOMPLETE
    return "PASS", EXIT_PASS


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list] = None, attention_functions: Optional[Mapping[str, Callable]] = None) -> int:
    """Run the verification and print the table (or the JSON report with --json).

    Args:
        argv: command-line arguments (default sys.argv[1:]).
        attention_functions: the attention table the teacher-forced passes call, name -> function with the common
            signature (default gpt2_decoder.ATTENTION_FUNCTIONS). Tests pass a copy with a broken entry to prove a
            bad kernel fails its rows; greedy generation always runs the model's own backends by name.

    Returns:
        0 when every row passes, 1 when a row fails, 2 for bad arguments, 3 when no row fails but some were skipped.
    """
    args = build_parser().parse_args(argv)
    table = dict(ATTENTION_FUNCTIONS if attention_functions is None else attention_functions)
    try:
        check_request(args, table)
    except ValueError as exc:
        sys.stderr.write(f"verify_npu.py: error: {exc}\n")
        return EXIT_USAGE
    # Only an accelerator run needs the NPU environment, and it must be set before torch_npu loads; a CPU-only run
    # leaves os.environ alone.
    cpu_only = all(name.lower() == REFERENCE[0] for name in split_list(args.devices))
    applied = {} if cpu_only else devices.apply_recommended_env()
    environment = verification.environment_report(split_list(args.devices), applied)
    try:
        assets = verification.load_assets(args.text, args.seed, None if args.tiny else args.model_path,
                                          args.prompt_audio_path)
        rows = plan_rows(args)
        codec_cache: dict = {}
        reference = verification.run_reference(assets, args.frames, codec_cache)
    except ValueError as exc:
        sys.stderr.write(f"verify_npu.py: error: {exc}\n")
        return EXIT_USAGE
    return _finish(args, environment, assets, reference, rows, table, codec_cache)


def _finish(args, environment, assets, reference, rows, table, codec_cache) -> int:
    """Run the planned rows, write the report and wavs, print the result and return the exit code."""
    for row in rows:
        if row.status != "SKIP":
            reset_peak_rss()
            verification.run_row(row, assets, reference, table, args.frames, codec_cache)
    if not reference.summary["teacher_forced_reproduces_greedy"]:
        rows.insert(0, Row(*REFERENCE, status="FAIL", reason="teacher forcing does not reproduce the reference's "
                                                              "greedy frames: the verifier itself is wrong"))
    verdict, code = verdict_of(rows)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(args, environment, assets, reference, rows, verdict, code)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    save_wavs(out_dir, rows, reference.decoded, assets.codec_config.sampling_rate)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_text_output(environment, reference, rows, verdict, out_dir) + "\n")
    return code


def _text_output(environment: dict, reference: Reference, rows: list[Row], verdict: str, out_dir: Path) -> str:
    summary = reference.summary
    header = (f"reference: {' '.join(REFERENCE)}, {summary['prompt_rows']} prompt rows, {summary['frames']} greedy "
              f"frames; teacher forcing reproduces them: {summary['teacher_forced_reproduces_greedy']}")
    return "\n".join([
        "== environment", render_environment(environment), "", "== rows (vs " + " ".join(REFERENCE) + ")", header,
        render_table(rows), "",
        f"verdict: {verdict}  ({sum(r.status == 'PASS' for r in rows)} pass, "
        f"{sum(r.status == 'FAIL' for r in rows)} fail, {sum(r.status == 'SKIP' for r in rows)} skip)",
        f"report: {out_dir / REPORT_NAME}   wavs: {out_dir / 'wavs'}",
    ])
