"""The README's tiny recipe, run as written: its shell commands and Python blocks that use /tmp/moss_tiny, taken from
the README itself, in a fresh folder with no network (HF_HUB_OFFLINE=1) and nothing from ../shared. The only change
is the folder: /tmp/moss_tiny becomes a folder of this test. Every Python block of the README must at least compile,
and none may call a function it does not define or import (the old snippets called an undefined play())."""

import ast
import builtins
import os
import re
import shlex
import subprocess
import sys

import soundfile as sf

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
TINY = "/tmp/moss_tiny"
COMMAND_SECONDS = 600


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def tiny_commands():
    """Indented `python ...` command lines of the README that use the tiny repository, in README order."""
    return [line.strip() for line in README.splitlines()
            if line.startswith("    python ") and TINY in line]


def run(argv, cwd, **keywords):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MOSS_SHARED_DIR=str(cwd / "none"))
    completed = subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=COMMAND_SECONDS,
                               env=environment, **keywords)
    assert completed.returncode == 0, f"{argv}\n{completed.stdout}\n{completed.stderr}"
    return completed


def test_the_readme_tiny_recipe_runs_as_written_offline(tmp_path):
    folder = str(tmp_path / "moss_tiny")
    commands = tiny_commands()
    assert [shlex.split(command)[1] for command in commands] == ["measurement/checkpoints.py", "infer_npu.py"]
    for command in commands:
        argv = shlex.split(command.replace(TINY, folder))
        run([sys.executable, str(REPO_ROOT / argv[1]), *argv[2:]], tmp_path)
    info = sf.info(f"{folder}.wav")
    assert (info.samplerate, info.channels, info.frames) == (48000, 2, 8 * 3840)
    (block,) = [block for block in python_blocks() if TINY in block]
    completed = run([sys.executable, "-c", block.replace(TINY, folder)], tmp_path)
    assert completed.stdout.split("\n")[:2] == ["48000 (2, 30720)", "0.64"]


def test_every_readme_python_block_compiles_and_calls_only_names_it_has():
    known = set(dir(builtins))
    for block in python_blocks():
        tree = ast.parse(block)
        defined = known | {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                           if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        defined |= {target.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.For, ast.With))
                    for target in ast.walk(node) if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store)}
        called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name)}
        assert called <= defined, f"undefined {called - defined} in:\n{block}"
