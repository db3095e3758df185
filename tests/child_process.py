"""Run a snippet of test code in a fresh Python process.

The fake NPU devices rename torch's PrivateUse1 backend for the whole process, for good, so every test that installs
one runs its body here instead of in the pytest process. The child sees the repository as the package
`moss_tts_nano` (via local_package.py) and this tests folder on sys.path.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

_PREAMBLE = f"""
import sys
sys.path[:0] = [{str(REPO_ROOT)!r}, {str(TESTS_DIR)!r}]
"""


def run_child(body: str, *args: str, timeout: float = 240.0, env: dict = None) -> str:
    """Run `body` (dedented) with `args` as sys.argv[1:]; fail the calling test with its output unless it exits 0.

    Returns:
        The child's stdout.
    """
    child_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    script = _PREAMBLE + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            timeout=timeout, env=child_env, cwd=str(REPO_ROOT))
    if result.returncode != 0:
        raise AssertionError(f"child process failed (exit {result.returncode}):\n--- stdout\n{result.stdout}"
                             f"\n--- stderr\n{result.stderr}")
    return result.stdout
