"""House rules a newcomer relies on: README's layout table names every root file, and files stay short enough to read
(no library module over 700 lines, no script over 400; bench.py and loadtest.py hold one section per component)."""

from conftest import REPO_ROOT

SCRIPTS = {"infer_npu.py", "verify_npu.py", "serve.py", "bench.py", "loadtest.py"}
SECTIONED_SCRIPTS = {"bench.py", "loadtest.py"}
LIBRARY_LIMIT, SCRIPT_LIMIT = 700, 400


def _layout_table() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Repository layout"):readme.index("## Development")]


def test_readme_layout_table_names_every_root_file():
    table = _layout_table()
    names = sorted(path.name for pattern in ("*.py", "*.json", "requirements.txt") for path in REPO_ROOT.glob(pattern))
    missing = [name for name in names if f"`{name}`" not in table]
    assert not missing, f"README's layout table does not name {missing}"


def test_no_library_module_over_700_lines_and_no_script_over_400():
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in REPO_ROOT.glob("*.py")}
    too_long = {name: count for name, count in lengths.items() if name not in SECTIONED_SCRIPTS
                and count > (SCRIPT_LIMIT if name in SCRIPTS else LIBRARY_LIMIT)}
    assert not too_long, too_long
