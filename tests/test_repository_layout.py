"""House rules a newcomer relies on: the model repository is flat at the root and never reaches into the packages
(server/, voice_library/, settings/, measurement/), README's layout tables name every file, and files stay short enough to
read (no library module over 700 lines, no script over 400; bench.py and loadtest.py hold one section per
component)."""

import re

from conftest import REPO_ROOT

SCRIPTS = {"infer_npu.py", "verify_npu.py", "serve.py", "serve_ray.py", "bench.py", "loadtest.py"}
SECTIONED_SCRIPTS = {"bench.py", "loadtest.py"}
PACKAGES = ("server", "voice_library", "settings", "measurement")
LIBRARY_LIMIT, SCRIPT_LIMIT = 700, 400
RELATIVE_IMPORT = re.compile(r"^\s*from\s+(\.+)([\w.]*)\s+import\s+([\w, ]+)", re.M)


def _layout_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Repository layout"):readme.index("## Development")]


def _python_files():
    yield from REPO_ROOT.glob("*.py")
    for package in PACKAGES:
        yield from (REPO_ROOT / package).glob("*.py")


def test_readme_layout_names_every_file_of_the_root_and_of_each_package():
    table = _layout_section()
    names = [path.name for pattern in ("*.py", "*.json", "requirements*.txt", "*.yaml") for path in REPO_ROOT.glob(pattern)]
    names += [f"{package}/{path.name}" for package in PACKAGES for path in (REPO_ROOT / package).glob("*.py")
              if path.name != "__init__.py"]
    missing = sorted(name for name in names if f"`{name}`" not in table)
    assert not missing, f"README's layout section does not name {missing}"


def test_the_model_repository_at_the_root_never_imports_a_package():
    """What remote code loads is flat: a root library module importing server/ or the others would drag them in."""
    offenders = []
    for path in REPO_ROOT.glob("*.py"):
        if path.name in SCRIPTS:
            continue
        for dots, module, names in RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
            targets = [module.split(".")[0]] if module else [name.strip() for name in names.split(",")]
            offenders += [f"{path.name} -> {target}" for target in targets if target in PACKAGES]
    assert not offenders, offenders


def test_no_library_module_over_700_lines_and_no_script_over_400():
    lengths = {str(path.relative_to(REPO_ROOT)): len(path.read_text(encoding="utf-8").splitlines())
               for path in _python_files()}
    too_long = {name: count for name, count in lengths.items() if name not in SECTIONED_SCRIPTS
                and count > (SCRIPT_LIMIT if name in SCRIPTS else LIBRARY_LIMIT)}
    assert not too_long, too_long
