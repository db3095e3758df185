"""bench.py runs end to end on a tiny budget: its codec section reports every row the README quotes."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO_ROOT


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", REPO_ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_codec_section_reports_steady_state_stream_start_and_the_chosen_layout(capsys):
    command = [sys.executable, "bench.py", "--section", "codec", "--frames-per-call", "1", "--stream-frames", "1",
               "--runs", "1", "--warmup", "0", "--prefill-seconds", "0.08", "--start-seconds", "0.16",
               "--offline-seconds", "0.16", "--json"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["kernels"]["codec"].split()[0] in ("k-major", "row-major"), report["kernels"]
    codec = report["codec"]
    assert [row["frames_per_call"] for row in codec["streaming"]] == [1, 1]
    (start,) = codec["stream_start"]
    assert start["frames"] == 2 and start["ms_per_frame_median"] > 0
    assert codec["offline"]["decode_rtf"] > 0
    _bench_module().print_codec(codec)
    printed = capsys.readouterr().out
    assert "1 frame(s)/call" in printed and "first 2 frames of fresh streams" in printed, printed


def test_engine_section_compares_another_checkout_on_its_own_model_classes():
    """--compare-engine loads a checkout as a package of its own and builds its model and codec with its own modules
    (same weights), so that an older engine runs the code it was written against; here the checkout is this one."""
    command = [sys.executable, "bench.py", "--section", "engine", "--weight-format", "fp32", "--streams", "1",
               "--engine-frames", "2", "--compare-engine", str(REPO_ROOT), "--json"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    formats = json.loads(done.stdout)["engine"]["formats"]
    assert [entry["engine"] for entry in formats] == [REPO_ROOT.name, "this"]
    for entry in formats:
        (row,) = entry["rows"]
        assert row["errors"] == 0 and row["frames"] == 2, entry
