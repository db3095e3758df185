"""Only devices.py may name device types (house rule): a syntax-level check of every library file.

The rule, applied to every .py file at the repository root except devices.py (library modules and the scripts
infer_npu.py, verify_npu.py, bench.py, local_package.py alike; the scripts pass the user's --device string through
to devices.resolve_device, which needs no device names in their code):
- no identifier, attribute, import or parameter named `cuda`, `npu`, `torch_npu`, `is_cuda`, `is_npu`, or starting
  with `flash_attn` (catches torch.cuda, torch.npu, x.cuda(), import torch_npu, from flash_attn import ...);
- no string constant (f-string parts included) whose whole value, trimmed and lower-cased, is a device string
  `cuda`, `npu`, `cuda:N`, `npu:N` (or the `npu:` prefix of an f-string), or a module path `torch_npu[.x]` /
  `flash_attn[.x]` (catches device_type="cuda", getattr(torch, "npu"), import_module("torch_npu")).
Prose in docstrings, comments and help texts ("runs on Ascend NPU", "e.g. npu:0 or cuda") is allowed, and so are
backend names such as "npu_fusion_attention" and "flash_attention_2", and the device-neutral "cpu" and "auto".
Code needing a device fact asks the spec: devices.device_spec(...).type == devices.NPU, spec.module, and so on.
"""

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT

FORBIDDEN_NAMES = {"cuda", "npu", "torch_npu", "is_cuda", "is_npu"}
FORBIDDEN_NAME_PREFIX = "flash_attn"
FORBIDDEN_STRING = re.compile(r"^(?:(?:cuda|npu)(?::\d*)?|(?:torch_npu|flash_attn)(?:\.\w+)*)$")
ALLOWED_FILES = {"devices.py"}


def _names(node):
    """Identifiers a node introduces or uses."""
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
    elif isinstance(node, ast.arg):
        yield node.arg
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name
    elif isinstance(node, ast.alias):
        yield from node.name.split(".")
        if node.asname:
            yield node.asname
    elif isinstance(node, ast.ImportFrom) and node.module:
        yield from node.module.split(".")


def device_name_violations(source: str, filename: str = "<source>") -> list:
    """Every place in `source` that names a device type, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        for name in _names(node):
            if name in FORBIDDEN_NAMES or name.startswith(FORBIDDEN_NAME_PREFIX):
                found.append(f"{filename}:{node.lineno}: name {name!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if FORBIDDEN_STRING.match(node.value.strip().lower()):
                found.append(f"{filename}:{node.lineno}: string {node.value!r}")
    return found


def library_files() -> list:
    return sorted(path for path in Path(REPO_ROOT).glob("*.py") if path.name not in ALLOWED_FILES)


def test_no_library_file_but_devices_names_a_device_type():
    violations = []
    for path in library_files():
        violations += device_name_violations(path.read_text(encoding="utf-8"), path.name)
    assert violations == [], "only devices.py may name device types:\n" + "\n".join(violations)


@pytest.mark.parametrize("line", [
    "import torch_npu", "from flash_attn import flash_attn_func", "import flash_attn.bert_padding as bp",
    "torch.cuda.synchronize()", "free = torch.npu.mem_get_info(d)", "x = x.cuda()", "ok = t.is_npu",
    "if device.type == 'cuda': pass", "torch.autocast(device_type='npu')", "d = torch.device('npu:1')",
    "m = getattr(torch, 'npu')", "importlib.import_module('torch_npu')", "d = f'npu:{index}'",
    "def f(npu=None): pass", "use = flash_attn_available"])
def test_checker_flags_device_names(line):
    assert device_name_violations(line)


@pytest.mark.parametrize("line", [
    '"""Runs on Ascend NPU, CUDA or CPU (e.g. npu:0)."""', "# torch.cuda is named in devices.py only",
    "name = 'npu_fusion_attention'", "impl = 'flash_attention_2'", "d = devices.resolve_device('cpu')",
    "spec = devices.device_spec(args.device)", "same = spec.type == devices.NPU",
    "parser.add_argument('--device', default='auto', help='auto, cpu, cuda:N or npu:N')",
    "out = devices.flash_attention(m, q, k, v, mask, s)"])
def test_checker_allows_prose_backend_names_and_devices_api(line):
    assert device_name_violations(line) == []


def test_devices_itself_is_where_the_names_live():
    assert device_name_violations((Path(REPO_ROOT) / "devices.py").read_text(encoding="utf-8"))
