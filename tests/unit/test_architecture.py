"""The floors of docs/architecture.md, enforced over the project's import graph.

import-linter (grimp) finds a package's modules by walking its folder; this project maps its
folders into one namespace (pyproject's ``package-dir``: ``core/`` is ``mofserve.core``), which an
editable install serves through an import hook that grimp cannot follow. So the graph is built
here from the source with ``ast``: every ``import mofserve...`` / ``from mofserve... import`` /
relative import of every module, at module level or inside a function (a function-level import
is still a dependency, only a hidden one).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Who may import whom (docs/architecture.md, "Floors"): a package may import the ones listed
#: and itself. ``mofserve`` is the top: cli.py, demo.py, protogen.py and the generated v1 stubs.
FLOORS: dict[str, set[str]] = {
    "mofserve.core": set(),
    "mofserve.export": {"mofserve.core"},
    "mofserve.model_repository": {"mofserve.core", "mofserve.export"},
    "mofserve.server": {"mofserve.core", "mofserve.export", "mofserve.v1", "mofserve.protogen"},
    "mofserve.clients": {"mofserve.v1", "mofserve.protogen"},
    "mofserve.evaluation": {"mofserve.core", "mofserve.clients", "mofserve.v1"},
    "mofserve.benchmarks": {"mofserve.core", "mofserve.export", "mofserve.server", "mofserve.clients",
                            "mofserve.evaluation", "mofserve.v1", "mofserve.protogen"},
}
#: model_repository imports export's torch runtime (the gpu-torch encoders serve the exported
#: wrappers, docs/architecture.md); nothing else of export.
MODEL_REPOSITORY_EXPORT = {"mofserve.export.torch_runtime", "mofserve.export.configs"}


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module of every mapped package (sub-packages included)."""
    modules: dict[str, Path] = {}
    for package, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if any(part.startswith(".") or part in ("build", "__pycache__") for part in relative.parts):
                continue
            if package == "mofserve" and relative.parts[0] != "v1" and len(relative.parts) > 1:
                continue  # only mofserve/*.py and the generated stubs belong to the top package
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The project modules an ``ImportFrom`` names (``from . import x`` may name a module or a symbol)."""
    if node.level:
        package = module.split(".")
        is_package = MODULES[module].name == "__init__.py"
        base = package if is_package else package[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    names = [f"{target}.{alias.name}" for alias in node.names]
    found = [name for name in names if name in MODULES]
    return found or ([target] if target in MODULES else [_owner(target)] if _owner(target) else [])


def _owner(name: str) -> str | None:
    """The project module that ``name`` is, or the nearest one containing it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


LAZY = "# lazy:"  # the marker of a function-level import kept on purpose, followed by its reason


def _imports() -> dict[str, dict[str, bool]]:
    """module -> {imported project module: at module level, or inside a function with a reason
    (False: inside a function or class without one)}."""
    graph: dict[str, dict[str, bool]] = {}
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source, str(path))
        edges: dict[str, bool] = {}
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):  # a function-level import with its reason counts as deliberate
            if isinstance(node, ast.Import | ast.ImportFrom) and any(
                    LAZY in lines[i] for i in range(max(node.lineno - 2, 0), node.end_lineno)):
                top_level.add(id(node))
        type_checking = {id(n) for node in tree.body if isinstance(node, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue  # annotations only: no dependency at run time
            if isinstance(node, ast.Import):
                targets = [_owner(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, node)
            else:
                continue
            for target in filter(None, targets):
                if target != module:
                    edges[target] = edges.get(target, False) or id(node) in top_level
        graph[module] = edges
    return graph


GRAPH = _imports()


def _package(module: str) -> str:
    for package in sorted(FLOORS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return "mofserve"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_covers_every_package():
    packages = {_package(m) for m in MODULES}
    assert set(FLOORS) <= packages and len(MODULES) > 80
    assert "mofserve.core.llm_engine" in MODULES and "mofserve.server.engine" in MODULES


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_each_package_imports_only_the_floors_below_it(package):
    allowed = FLOORS[package] | {package}
    wrong = sorted(f"{module} -> {target}" for module, edges in GRAPH.items() if _package(module) == package
                   for target in edges if not any(target == a or target.startswith(a + ".") for a in allowed))
    if package == "mofserve.model_repository":
        wrong = [w for w in wrong if w.split(" -> ")[1] not in MODEL_REPOSITORY_EXPORT]
    assert not wrong, "imports across the floors of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles = _cycles({module: set(edges) for module, edges in GRAPH.items()})
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_function_level_imports_of_project_modules_are_gone():
    """A project module imported inside a function hides a dependency (and, often, a cycle): the
    floors above are the reason a module may import another, so it imports it at the top. The
    exception is a module that pulls a heavy optional dependency (torch, transformers, TensorRT)
    into a path that does not always need it, e.g. a CLI command: the import then says why, with
    a ``# lazy: <reason>`` comment on its line or the line before."""
    hidden = sorted(f"{module} -> {target}" for module, edges in GRAPH.items()
                    for target, top in edges.items() if not top)
    assert not hidden, "function-level imports of project modules:\n" + "\n".join(hidden)
