"""verify_npu.py end to end on small random models: the CPU case passes, a broken attention fails, the simulated NPU
passes.

The script's verdict must come from teacher-forced comparisons against CPU float32 eager, so a backend that drops the
attention mask (injected here through a COPY of the attention table handed to main, never by patching torch) has to
turn its rows into FAIL and the exit code non-zero. The fake-NPU run happens in a child process because installing
the fake renames torch's PrivateUse1 backend for the whole process.
"""

import json

import pytest
import torch

from child_process import run_child
from fake_cuda import FakeCuda
from conftest import import_module

verify_npu = import_module("verify_npu")
gpt2_decoder = import_module("gpt2_decoder")
devices = import_module("devices")
weight_formats = import_module("weight_formats")

FRAMES = "3"  # few frames: prefill, steady decode, and a streamed codec step each


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box, tiny ops with 2 OpenMP threads spend most time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *extra, table=None):
    argv = ["--tiny", "--devices", "cpu", "--frames", FRAMES, "--output-dir", str(tmp_path), *extra]
    return verify_npu.main(argv, attention_functions=table)


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / verify_npu.REPORT_NAME).read_text())


def _table_lines(stdout: str, device: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith(device + " ")]


def test_cpu_float32_and_bfloat16_with_eager_and_sdpa_pass_and_exit_zero(tmp_path, capsys, one_thread):
    code = _run(tmp_path, "--dtypes", "float32,bfloat16", "--attn", "eager,sdpa")
    out = capsys.readouterr().out
    lines = _table_lines(out, "cpu")
    assert code == 0, out
    assert len(lines) == 4 and all(" PASS " in line for line in lines), out
    assert "verdict: PASS" in out and "teacher forcing reproduces them: True" in out
    report = _report(tmp_path)
    assert report["verdict"] == "PASS" and report["exit_code"] == 0
    rows = {(row["dtype"], row["attention"]): row for row in report["rows"]}
    assert set(rows) == {(d, a) for d in ("float32", "bfloat16") for a in ("eager", "sdpa")}
    assert len(rows["bfloat16", "sdpa"]["metrics"]["audio"]["per_head"]) == 16
    assert rows["float32", "sdpa"]["metrics"]["greedy"]["match"] == 1.0
    assert len(list((tmp_path / "wavs").glob("*.wav"))) == 5  # the reference + one per row


def test_attention_that_drops_the_mask_fails_its_rows_and_exits_nonzero(tmp_path, capsys, one_thread):
    def sdpa_without_mask(module, query, key, value, mask, scaling):
        return gpt2_decoder.sdpa_attention(module, query, key, value, None, scaling)

    broken = dict(gpt2_decoder.ATTENTION_FUNCTIONS, sdpa=sdpa_without_mask)  # a copy: the real table is untouched
    code = _run(tmp_path, "--dtypes", "float32", "--attn", "eager,sdpa", table=broken)
    out = capsys.readouterr().out
    assert code == verify_npu.EXIT_FAIL, out
    eager, sdpa = _table_lines(out, "cpu")
    assert " PASS " in eager and " FAIL " in sdpa and "hidden_cos=" in sdpa, out
    assert "verdict: FAIL" in out
    assert gpt2_decoder.ATTENTION_FUNCTIONS["sdpa"] is gpt2_decoder.sdpa_attention


@pytest.mark.skipif(not weight_formats.int8_kernels_available(), reason="this torch build has no int8 linear kernels")
def test_bf16_and_int8_weight_format_rows_pass_against_the_fp32_reference(tmp_path, capsys, one_thread):
    code = _run(tmp_path, "--dtypes", "float32", "--attn", "eager", "--weight-formats", "bf16,int8")
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[1]: line for line in _table_lines(out, "cpu")}  # dtype column -> line
    assert set(lines) == {"float32", "bf16", "int8"}, out
    assert " bf16 weights  eager  PASS " in lines["bf16"] and " int8 weights  eager  PASS " in lines["int8"], out
    rows = {row["weight_format"]: row for row in _report(tmp_path)["rows"]}
    for fmt, min_cosine in (("bf16", 0.999), ("int8", 0.995)):  # issue 7's promise
        assert rows[fmt]["metrics"]["audio"]["cosine_min"] >= min_cosine
    assert rows["int8"]["dtype"] == "float32" and rows[None]["dtype"] == "float32"
    assert (tmp_path / "wavs" / "cpu_int8-weights_eager.wav").is_file()


def test_weight_format_a_device_cannot_run_is_planned_as_a_skip_row_with_the_reason(monkeypatch):
    monkeypatch.setattr(devices, "_load_torch_npu", lambda: None)
    monkeypatch.setattr(devices, "_load_cuda_module", lambda: FakeCuda())  # a GPU machine, simulated
    args = verify_npu.build_parser().parse_args(["--tiny", "--devices", "cuda", "--dtypes", "float32", "--attn",
                                                 "sdpa", "--weight-formats", "int8,bf16"])
    rows = {row.label: row for row in verify_npu.plan_rows(args)}
    assert set(rows) == {"float32", "int8 weights", "bf16 weights"}
    assert rows["int8 weights"].status == "SKIP" and "runs on CPU" in rows["int8 weights"].reason
    assert rows["bf16 weights"].status == "PASS" and rows["bf16 weights"].dtype == "bfloat16"  # planned to run


def test_unknown_weight_format_is_a_usage_error_naming_it(tmp_path, capsys):
    code = _run(tmp_path, "--weight-formats", "bf16,int4")
    assert code == verify_npu.EXIT_USAGE
    assert "'int4'" in capsys.readouterr().err


def test_backend_that_cannot_run_here_is_a_skip_row_and_not_a_pass(tmp_path, capsys, one_thread):
    code = _run(tmp_path, "--dtypes", "float32", "--attn", "flash_attention_2")
    out = capsys.readouterr().out
    assert code == verify_npu.EXIT_INCOMPLETE, out
    (line,) = _table_lines(out, "cpu")
    assert " SKIP " in line and "flash_attention_2 cannot run on cpu" in line


def test_unknown_attention_name_is_a_usage_error_naming_it(tmp_path, capsys):
    code = _run(tmp_path, "--attn", "eager,flashy")
    assert code == verify_npu.EXIT_USAGE
    assert "'flashy'" in capsys.readouterr().err


def test_simulated_npu_runs_the_verification_to_a_pass_table(fake_npu_path, tmp_path):
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 10):
        pytest.skip(f"the level-2 fake NPU needs torch >= 2.10 (python PrivateUse1 backend), this is {torch.__version__}")
    out = run_child("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import fake_npu
    fake_npu.install(level=2)  # before the model code is imported
    import torch
    torch.set_num_threads(1)
    from local_package import import_module
    verify_npu = import_module("verify_npu")
    code = verify_npu.main(["--tiny", "--devices", "npu", "--dtypes", "float32,float16", "--attn", "sdpa",
                            "--frames", sys.argv[2], "--output-dir", sys.argv[3]])
    print("exit", code)
    """, str(fake_npu_path.parent), FRAMES, str(tmp_path))
    lines = _table_lines(out, "npu:0")
    assert out.strip().endswith("exit 0"), out
    assert len(lines) == 2 and all(" PASS " in line for line in lines), out
    assert "(fake)" in out  # the environment section names the simulated device
    report = _report(tmp_path)
    assert {row["device"] for row in report["rows"]} == {"npu:0"} and report["verdict"] == "PASS"


def test_default_output_folder_is_ignored_by_git():
    """A run from the repository folder (as the README shows) must leave `git status` clean."""
    import shutil
    import subprocess

    from conftest import REPO_ROOT

    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    default = verify_npu.build_parser().parse_args(["--tiny"]).output_dir
    paths = [f"{default}/npu_verification_report.json", f"{default}/wavs/cpu.wav",
             "verify_npu_output/npu_verification_report.json"]  # the folder earlier versions wrote
    result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(paths)
