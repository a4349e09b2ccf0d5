"""The shape of the source tree: no import cycles, short functions, imports at the top.

Read with ``ast`` (nothing is imported), so the tests see function-level imports too, which
``sys.modules`` would hide: a cycle "hidden" by an import inside a function is still a cycle.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "errwrap"

MAX_STATEMENTS = 80

# Import name of each dependency in pyproject.toml (test_dependencies_are_known keeps these in step).
MANDATORY = {"torch": "torch", "timm": "timm", "numpy": "numpy", "huggingface_hub": "huggingface_hub",
             "safetensors": "safetensors", "pillow": "PIL", "tqdm": "tqdm"}
OPTIONAL = {"segmentation-models-pytorch": "segmentation_models_pytorch", "transformers": "transformers",
            "scipy": "scipy", "onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime",
            "triton": "triton"}
DEV_ONLY = {"pytest", "hypothesis", "ruff", "mypy"}  # the "dev" extra's test and lint tools, never imported by errwrap

# Known offenders while issue 15 is merged, each removed when the refactor named above it lands
# (the lead empties these lists after merging; the tests fail when a listed offender is gone).
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()
KNOWN_LONG_FUNCTIONS: frozenset[str] = frozenset()
KNOWN_LOCAL_IMPORTS: frozenset[tuple[str, str]] = frozenset()
#: Imports of a mandatory dependency kept inside a function on purpose, with the reason.
LAZY_BY_DESIGN: dict[tuple[str, str], str] = {
    # timm adds ~1.4 s to `import errwrap` (1.5 s with torch) and is needed only to build
    # errwrap's own DeepLabV3+ or to check a timm encoder name in a saved config.
    ("errwrap.models.deeplabv3plus._create_encoder", "timm"): "import time",
    ("errwrap.adapters.specs.check_timm_name", "timm"): "import time",
}


# ---------------------------------------------------------------------------- reading the tree
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, str | None]]:
    """Every runtime import of ``tree`` (``if TYPE_CHECKING:`` blocks left out) with the qualified
    name of the function it sits in (``None`` at module or class level)."""

    def visit(node: ast.AST, scope: str, function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, str | None]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from visit(other, scope, function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, scope if function else None
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, f"{scope}{'.' if scope else ''}{child.name}", True)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{scope}{'.' if scope else ''}{child.name}", function)
            else:
                yield from visit(child, scope, function)

    yield from visit(tree, "", False)


def _absolute(node: ast.ImportFrom, module: str) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules (of any package) that an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _absolute(node, module)
    # ``from pkg import name``: ``pkg.name`` when that is a module of ours, else ``pkg`` itself.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _executed(target: str, importer: str) -> list[str]:
    """The errwrap modules that importing ``target`` from ``importer`` runs: ``target`` and every
    package ``__init__`` on the way to it that is not already a package of ``importer``."""
    if target != "errwrap" and not target.startswith("errwrap."):
        return []
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    importer_packages = {importer.rsplit(".", i)[0] for i in range(importer.count(".") + 1)}
    return [m for m in chain if m in MODULES and (m == target or m not in importer_packages)]


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` among errwrap's modules, function-level imports included."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, (_, tree) in MODULES.items():
        for node, _function in _imports(tree):
            for target in _targets(node, name):
                graph[name].update(m for m in _executed(target, name) if m != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            connect(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component has one


def statement_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Statements of a function's body, nested blocks and nested functions included."""
    return sum(isinstance(node, ast.stmt) for stmt in function.body for node in ast.walk(stmt))


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


# ---------------------------------------------------------------------------- the rules
def test_no_import_cycle() -> None:
    graph = import_graph()
    for importer, imported in KNOWN_CYCLE_EDGES:
        assert imported in graph[importer], f"allow-listed edge {importer} -> {imported} is gone: remove it"
        graph[importer].discard(imported)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among errwrap modules (function-level imports count):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_no_function_over_80_statements() -> None:
    long = {}
    for name, (_, tree) in MODULES.items():
        for function, node in _functions(tree):
            count = statement_count(node)
            if count > MAX_STATEMENTS:
                long[f"{name}.{function}"] = count
    unexpected = {k: v for k, v in long.items() if k not in KNOWN_LONG_FUNCTIONS}
    assert not unexpected, f"functions over {MAX_STATEMENTS} statements: " + ", ".join(
        f"{k} ({v})" for k, v in sorted(unexpected.items())
    )
    assert set(long) >= KNOWN_LONG_FUNCTIONS, f"no longer too long: {sorted(KNOWN_LONG_FUNCTIONS - set(long))}"


def optional_modules() -> set[str]:
    """errwrap modules that import an optional dependency at their top (such as the Triton
    kernels): importing one of them inside a function is what keeps the dependency optional."""
    optional = set(OPTIONAL.values())
    return {
        name
        for name, (_, tree) in MODULES.items()
        for node, function in _imports(tree)
        if function is None and any(t.partition(".")[0] in optional for t in _targets(node, name))
    }


def _local_imports() -> dict[tuple[str, str], int]:
    """``(module.function, imported module) -> line`` for function-level imports of errwrap
    modules (other than :func:`optional_modules`) and of mandatory dependencies."""
    mandatory, lazy = set(MANDATORY.values()), optional_modules()
    found = {}
    for name, (_, tree) in MODULES.items():
        for node, function in _imports(tree):
            if function is None:
                continue
            for target in _targets(node, name):
                ours = (target == "errwrap" or target.startswith("errwrap.")) and target not in lazy
                if ours or target.partition(".")[0] in mandatory:
                    found[(f"{name}.{function}", target)] = node.lineno
    return found


def test_no_function_level_import_of_errwrap_or_mandatory_dependency() -> None:
    found = _local_imports()
    unexpected = {k: v for k, v in found.items() if k not in KNOWN_LOCAL_IMPORTS and k not in LAZY_BY_DESIGN}
    shown = "\n".join(f"{f} imports {m} (line {line})" for (f, m), line in sorted(unexpected.items()))
    assert not unexpected, f"imports inside functions (move them up; only optional dependencies may stay):\n{shown}"
    assert set(found) >= KNOWN_LOCAL_IMPORTS, f"no longer imported locally: {sorted(KNOWN_LOCAL_IMPORTS - set(found))}"
    assert set(found) >= set(LAZY_BY_DESIGN), f"no longer lazy: {sorted(set(LAZY_BY_DESIGN) - set(found))}"


def test_import_errwrap_does_not_import_timm() -> None:
    """What LAZY_BY_DESIGN buys: `import errwrap` leaves timm unimported."""
    code = "import sys, errwrap; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_optional_modules_are_found() -> None:
    assert "errwrap.ops._triton_fusion" in optional_modules()
    assert "errwrap.ops.fusion" not in optional_modules()


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_dependencies_are_known() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    mandatory = {_distribution(d) for d in project["dependencies"]}
    optional = {_distribution(d) for extra in project["optional-dependencies"].values() for d in extra}
    assert mandatory == set(MANDATORY), f"update MANDATORY: pyproject.toml depends on {sorted(mandatory)}"
    assert optional - mandatory == set(OPTIONAL) | DEV_ONLY, f"update OPTIONAL: the extras name {sorted(optional)}"


# ---------------------------------------------------------------------------- the checker itself
def test_the_graph_sees_function_level_and_package_imports() -> None:
    graph = import_graph()
    assert "errwrap.heads" in graph["errwrap.wrapper"]
    assert "errwrap.ops.fusion" in graph["errwrap.heads"]  # importing errwrap.ops.fusion runs errwrap.ops too
    assert "errwrap.ops" in graph["errwrap.heads"]
    tree = ast.parse("def f():\n    from . import heads\n    from .data.loader import make_loader\n")
    assert [(type(n).__name__, f) for n, f in _imports(tree)] == [("ImportFrom", "f"), ("ImportFrom", "f")]
    nodes = [n for n, _ in _imports(tree)]
    assert _targets(nodes[0], "errwrap.cli") == ["errwrap.heads"]
    assert _executed("errwrap.data.loader", "errwrap.cli") == ["errwrap.data", "errwrap.data.loader"]
    assert _executed("errwrap.data.loader", "errwrap.data.aerial") == ["errwrap.data.loader"]


def test_find_cycles_prints_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_statement_count_includes_nested_blocks() -> None:
    source = "def f(x):\n    if x:\n        y = 1\n        return y\n    def g():\n        pass\n    return 0\n"
    tree = ast.parse(source)
    assert statement_count(tree.body[0]) == 6  # if, y =, return y, def g, pass, return 0
