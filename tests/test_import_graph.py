"""The package's import graph: no cycle, and the plugins import no operator.

The graph is built from the source (AST), with imports inside functions
counted as edges: a lazy import hides a cycle from Python, not from the
design. Imports under ``if TYPE_CHECKING:`` are left out (they never run).
Python's package semantics are applied: importing ``a.b.c`` first imports
the package ``a.b``, so the edge also goes to ``a/b/__init__.py`` (unless it
is an ancestor of the importer, which is already being imported).

What is not clean yet is listed in baselines that may only shrink: a new
cycle or a new plugin-to-operator edge fails, and so does a baseline entry
that no longer exists (remove it, so it cannot come back unnoticed). Issue
18 empties both.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import aimss_dask

ROOT = pathlib.Path(aimss_dask.__file__).parent
PACKAGE = "aimss_dask"

#: Modules that are in an import cycle today: none, and it stays so.
CYCLE_BASELINE: set[str] = set()

#: The core: the layers every operator builds on.
CORE = (
    "aimss_dask.core",
    "aimss_dask.log",
    "aimss_dask.transport",
    "aimss_dask.coordinator",
    "aimss_dask.node",
    "aimss_dask.api",
)
OPERATORS = ("aimss_dask.shuffle", "aimss_dask.sink", "aimss_dask.source")

#: Core-to-operator edges: none, and it stays so.
CORE_TO_OPERATOR_BASELINE: set[tuple[str, str]] = set()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: in functions too, not under TYPE_CHECKING."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, node: ast.Import | ast.ImportFrom, known: set[str]) -> Iterator[str]:
    """The package modules ``node`` in module ``name`` imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                yield _nearest(alias.name, known)
        return
    if node.level:
        is_pkg = (ROOT.parent / pathlib.Path(*name.split("."))).is_dir()
        base = name.split(".")
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if mod.split(".")[0] != PACKAGE:
        return
    for alias in node.names:
        full = f"{mod}.{alias.name}"
        yield full if full in known else _nearest(mod, known)


def _nearest(mod: str, known: set[str]) -> str:
    while mod not in known:
        mod = mod.rsplit(".", 1)[0]
    return mod


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports (package semantics, lazy imports included)."""
    mods = modules()
    known = set(mods)
    out: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            for target in _targets(name, node, known):
                parts = target.split(".")
                # Importing a.b.c runs a/__init__ and a/b/__init__ first.
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep != name and not name.startswith(dep + ".") and dep in known:
                        out[name].add(dep)
    return out


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        # Iterative, so deep graphs cannot hit the recursion limit.
        work = [(v, iter(sorted(g[v])))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        found.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports_and_packages():
    """The parser itself: cases the rules depend on."""
    g = graph()
    # A top-level import.
    assert "aimss_dask.log.records" in g["aimss_dask.log.store"]
    # An import inside a function.
    assert "aimss_dask.node.plugin" in g["aimss_dask.coordinator.plugin"]
    # The leaf imports nothing of ours but errors.
    for m in ("aimss_dask.core", "aimss_dask.core.names", "aimss_dask.core.specs"):
        assert g[m] <= {"aimss_dask.core.errors"}, (m, g[m])
    # Package semantics: importing aimss_dask.log.records runs aimss_dask.log first.
    assert "aimss_dask.log" in g["aimss_dask.node.plugin"]
    # TYPE_CHECKING imports are no edges (log.segment only types with spillfile).
    assert "aimss_dask.log.spillfile" not in g["aimss_dask.log.segment"]


def test_cycle_finder_finds_a_cycle_and_no_false_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_new_import_cycle():
    in_cycles = set().union(*cycles(graph()))
    new = sorted(in_cycles - CYCLE_BASELINE)
    assert not new, f"modules newly in an import cycle: {new}"
    gone = sorted(CYCLE_BASELINE - in_cycles)
    assert not gone, f"no longer in a cycle, remove from CYCLE_BASELINE: {gone}"


def test_the_core_imports_no_new_operator():
    g = graph()
    edges = {
        (src, dst)
        for src, dsts in g.items()
        if src.startswith(CORE)
        for dst in dsts
        if dst.startswith(OPERATORS)
    }
    new = sorted(edges - CORE_TO_OPERATOR_BASELINE)
    assert not new, f"the plugins or the stream API import an operator: {new}"
    gone = sorted(CORE_TO_OPERATOR_BASELINE - edges)
    assert not gone, f"gone, remove from CORE_TO_OPERATOR_BASELINE: {gone}"


#: What each layer may import besides itself (edges to a package's own
#: modules are free). Operators build on everything below them, never on
#: each other; nothing below the operators imports one.
LAYERS: dict[str, set[str]] = {
    "_compat": set(),
    "core": set(),
    # _compat: the one place that reads another library's internals.
    "log": {"core", "_compat"},
    "transport": {"core", "log"},
    # Pure power and filling policy (and lazy GPU imports): what any layer may plan with.
    "power": {"core"},
    "node": {"core", "log", "transport", "power"},
    # The coordinator installs the worker plugin on every worker.
    "coordinator": {"core", "transport", "node", "power"},
    "api": {"core", "transport", "power"},
    "ops": {"core", "transport", "api", "_compat"},
    "shuffle": {"core", "api", "ops", "node", "_compat"},
    "sink": {"core", "api", "ops", "node", "_compat"},
    "source": {"core", "api", "ops", "node", "_compat"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_layer_imports_only_the_layers_below_it():
    g = graph()
    wrong = sorted(
        (a, b)
        for a, targets in g.items()
        for b in targets
        if _layer(a) in LAYERS and _layer(b) != _layer(a) and _layer(b) not in LAYERS[_layer(a)]
    )
    assert not wrong, f"imports across layers that the architecture forbids: {wrong}"
    # The rule is checked: every layer named exists, and a forbidden edge is caught.
    assert {_layer(m) for m in g} >= set(LAYERS)
    assert "aimss_dask.shuffle" not in {b for a, ts in g.items() if _layer(a) == "sink" for b in ts}
