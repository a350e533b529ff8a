"""The package's import graph has no cycle, and no module imports another's `_private` names.

The graph is read from the source with `ast`, not by importing: every `import` and `from ...
import` of every module under unsloth_compile/, passes/ and kernels/ (as the package maps them:
`unsloth_compile.passes`, `unsloth_compile.kernels`), imports inside functions included, relative
imports resolved. Imports under `if TYPE_CHECKING:` count too: a cycle in the types is a cycle
in the design, and the first annotation evaluated at run time would close it.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "unsloth_compile"
# The source tree's folders and the package names they are imported under (source_layout.py).
FOLDERS = {ROOT / PACKAGE: PACKAGE, ROOT / "passes": f"{PACKAGE}.passes", ROOT / "kernels": f"{PACKAGE}.kernels"}
# The LoRA autograd modules are being merged into one unsloth_compile/ops/ package; their cycles
# among themselves are reported apart until then.


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of a source file."""
    for folder, name in FOLDERS.items():
        if folder in path.parents:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            return ".".join([name, *parts]), is_package
    raise AssertionError(path)


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for folder in FOLDERS:
        for path in sorted(folder.rglob("*.py")):
            name, is_package = _module_name(path)
            found[name] = (path, is_package)
    for name in FOLDERS.values():  # passes/ and kernels/ have no __init__.py in the source tree
        found.setdefault(name, (None, True))
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, name taken from it or "", line) for each import of `module`."""
    path, is_package = MODULES[module]
    if path is None:
        return []
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:  # `from package import submodule`
                    out.append((submodule, "", node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return [(target, name, line) for target, name, line in out if target in MODULES]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        graph[module] = {target for target, _, _ in _imports(module) if target != module}
    return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds cycles."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module of each component, shortest first, without repeats."""
    cycles = []
    for component in _components(graph):
        for start in component:
            body = _one_cycle(graph, set(component), start)[:-1]
            first = body.index(min(body))  # one spelling per cycle: from its first module
            cycle = body[first:] + body[:first] + [body[first]]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def _one_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle through `start`, by breadth-first search within its component."""
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(component)


def _format(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_graph_sees_the_package():
    graph = _graph()
    assert {"unsloth_compile.backend", "unsloth_compile.passes.lora.lora_linear",
            "unsloth_compile.kernels.lora.lora_gemm"} <= set(graph)
    assert "unsloth_compile.passes.fx_match" in graph["unsloth_compile.passes.lora.lora_linear"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert sorted(_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}})) == [["a", "b", "a"], ["a", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + _format(cycles)


def _private_imports() -> list[tuple[str, str, str, int]]:
    found = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if name.startswith("_") and not name.startswith("__") and target != module:
                found.append((module, target, name, line))
    return found


def _format_private(found) -> str:
    return "\n".join(f"{m}:{line} imports {name} from {t}" for m, t, name, line in found)


def test_no_private_names_across_modules():
    found = _private_imports()
    assert not found, "private names imported across modules:\n" + _format_private(found)


def test_kernels_import_nothing_of_the_project_but_the_error_type():
    allowed = (f"{PACKAGE}.kernels", f"{PACKAGE}.errors")
    found = [(module, target, line) for module in MODULES if module.startswith(f"{PACKAGE}.kernels.")
             for target, _, line in _imports(module) if not target.startswith(allowed)]
    assert not found, "\n".join(f"{m}:{line} imports {t}" for m, t, line in found)


def test_no_pass_runs_the_compiler():
    """The backend owns the hookup to AOTAutograd and Inductor; a pass only rewrites graphs."""
    compilers = ("compile_fx", "aot_autograd", "aot_module_simplified", "lookup_backend")
    found = []
    for module, (path, _) in MODULES.items():
        if module.startswith(f"{PACKAGE}.passes.") and path is not None:
            tree = ast.parse(path.read_text(), str(path))
            found += [f"{module}:{node.lineno} imports {alias.name}" for node in ast.walk(tree)
                      if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
                      if alias.name.rpartition(".")[2] in compilers]
            found += [f"{module} imports {target}" for target, _, _ in _imports(module)
                      if target in (f"{PACKAGE}.backend", f"{PACKAGE}.compressed_compile")]
    assert not found, "\n".join(found)
