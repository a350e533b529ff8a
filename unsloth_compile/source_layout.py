"""Maps `unsloth_compile.passes` and `unsloth_compile.kernels` onto the repository's top-level
`passes/` and `kernels/` folders when the package runs from its source tree.

A built wheel has both folders inside the package (pyproject.toml's package-dir mapping). In the
source tree they sit beside `unsloth_compile/` and carry no `__init__.py`, so that a checkout on
`sys.path` (`python -m pytest`, `python -m ...`, a notebook opened in the checkout) never hides an
installed distribution of the same name: transformers imports the `kernels` distribution, and a
folder without `__init__.py` loses to any regular package of that name. Here each folder becomes
the package's subpackage explicitly, whichever way `unsloth_compile` itself was found.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("passes", "kernels")


def map_source_subpackages(package_name: str, package_file: str) -> None:
    package_dir = Path(package_file).resolve().parent
    for name in SUBPACKAGES:
        full_name = f"{package_name}.{name}"
        if full_name in sys.modules or (package_dir / name).is_dir():
            continue  # already mapped, or an installed wheel: the subpackage sits inside the package
        source_dir = package_dir.parent / name
        if not source_dir.is_dir():
            raise ImportError(f"{package_name}: neither {package_dir / name} nor {source_dir} exists; "
                              "reinstall the package (pip install -e . from the repository root)")
        spec = importlib.machinery.ModuleSpec(full_name, None, is_package=True)
        spec.submodule_search_locations = [str(source_dir)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[full_name] = module
        setattr(sys.modules[package_name], name, module)
