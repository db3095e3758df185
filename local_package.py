"""Import this repository's flat root as a package, for the scripts and the tests.

`trust_remote_code` needs the library modules at the repository root with relative imports between them
(`from .devices import ...`). Such modules cannot be imported as top-level modules, so scripts run from a checkout
(`python infer_npu.py ...`) and the tests register the root folder as the package `moss_tts_nano` instead.
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "moss_tts_nano"
REPO_ROOT = Path(__file__).resolve().parent


def import_local_package(name: str = PACKAGE_NAME) -> ModuleType:
    """Register the repository root as package `name` (once) and return it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def import_module(module: str, package: str = PACKAGE_NAME) -> ModuleType:
    """Import `package.module` from the repository root, e.g. `import_module("devices")`."""
    import_local_package(package)
    return importlib.import_module(f"{package}.{module}")


def import_folder_as_package(folder, name: str) -> ModuleType:
    """Register any folder of modules that import each other relatively (e.g. a copy of upstream's remote code, for
    bench.py --compare-upstream) as package `name`, once; its modules are then `importlib.import_module(name + ".x")`.
    """
    if name not in sys.modules:
        package = ModuleType(name)
        package.__path__ = [str(Path(folder).resolve())]
        sys.modules[name] = package
    return sys.modules[name]
