"""The suite's own rules: under CI a missing ../shared fails the golden checks, and a missing optional extra (Ray
Serve) fails its tests, instead of skipping them."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

GOLDEN_TEST = "tests/test_tokenizer.py::test_encode_gives_golden_ids_and_pieces"


def _run_golden_test(tmp_path, ci: str):
    env = dict(os.environ, MOSS_SHARED_DIR=str(tmp_path / "no_shared_here"), CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", GOLDEN_TEST],
                          capture_output=True, text=True, cwd=str(REPO_ROOT), env=env, timeout=240)


def test_missing_shared_folder_fails_under_ci(tmp_path):
    result = _run_golden_test(tmp_path, "true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CI=true requires it" in result.stdout and "SKIPPED" not in result.stdout


def test_missing_shared_folder_skips_with_the_reason_outside_ci(tmp_path):
    result = _run_golden_test(tmp_path, "")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED" in result.stdout and "absent on a fresh clone" in result.stdout


def _import_missing_extra(ci: str):
    script = "import conftest; conftest.optional_module('no_such_extra_module', 'pip install -r requirements-x.txt')"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(REPO_ROOT / "tests"), env=dict(os.environ, CI=ci), timeout=120)


def test_a_missing_optional_extra_fails_under_ci_and_skips_with_the_reason_outside():
    in_ci, outside = _import_missing_extra("true"), _import_missing_extra("")
    assert "Failed: needs no_such_extra_module (pip install -r requirements-x.txt)" in in_ci.stderr, in_ci.stderr
    assert "CI=true requires it" in in_ci.stderr
    assert "Skipped: needs no_such_extra_module" in outside.stderr and "optional extra" in outside.stderr
