"""No private attributes of other libraries (issue 18, item 5).

The package's source (AST, every ``aimss_dask/**/*.py``) is scanned for two
kinds of reach into someone else's internals:

* ``<expr>._name`` (one leading underscore, not a dunder) where ``<expr>`` is
  not a bare ``self``/``cls``, and the same through ``getattr``/``setattr``/
  ``hasattr``/``delattr`` with a literal ``"_name"``;
* ``import a._b`` / ``from a._b import c`` / ``from a import _b`` of a package
  that is not ours.

A use is *suspect* when the attribute is a known private of a library we use
(``FOREIGN_PRIVATES``: computed from the classes in ``FOREIGN_CLASSES`` plus a
few spelled out) or when the object's name is clearly a foreign object
(``FOREIGN_OBJECTS``: ``client``, ``worker``, ``cond``, ``df``, …). Every
suspect use must be listed in ``ALLOWED`` with the reason, keyed by (file,
object as written, attribute); a listed use that is gone fails too, so the
list can only shrink.

What it catches: ``client._stream_handlers``, ``cond._waiters``,
``getattr(plugin.store._changed, "_waiters")``, ``self.scheduler._broker``,
a known private such as ``_meta`` or ``_mgr`` under any object name, any
private of an object named like a foreign one, and any private module import
of dask, distributed, zarr, pandas, ….

What it cannot: it infers no types, so a foreign object under a neutral name
(``obj._x``) whose private is not in ``FOREIGN_PRIVATES`` passes; access
through ``vars()``, ``__dict__``, a computed string or
``operator.attrgetter`` passes; so do privates of a foreign base class used
through ``self`` in our subclass, and anything outside ``aimss_dask/`` (tests,
benchmarks). The other way round, our own attribute that shares a name with a
foreign private is reported (hence the ``ALLOWED`` entries for our own
``_waiters`` and ``_loop``).
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import inspect
import pathlib
import re
import textwrap
import threading
from collections.abc import Iterator

import distributed

import aimss_dask

ROOT = pathlib.Path(aimss_dask.__file__).parent

#: Classes whose private names (class attributes and ``self._x = ...`` in their
#: source, over the MRO) we must not reach.
FOREIGN_CLASSES: tuple[type, ...] = (
    distributed.Client,
    distributed.Scheduler,
    distributed.Worker,
    distributed.Nanny,
    threading.Condition,
    threading.Event,
    asyncio.Event,
    asyncio.Condition,
    concurrent.futures.ThreadPoolExecutor,
)

#: Privates of C-backed or dynamically set attributes the class scan misses.
EXTRA_FOREIGN_PRIVATES = {"_mgr", "_meta", "_data", "_stream_handlers", "_event_handlers", "_waiters"}

#: Names that in this code base always hold an object of another library.
FOREIGN_OBJECTS = {
    "client", "worker", "scheduler", "nanny", "comm", "loop",
    "cond", "condition", "lock", "event", "executor", "pool",
    "df", "frame", "left", "right", "ddf", "arr", "array", "zarray", "group",
    "dask", "distributed", "zarr", "pd", "pandas", "np", "numpy",
    "threading", "asyncio",
}  # fmt: skip

IMPORT = "<import>"

#: Known uses, (file relative to aimss_dask/, object as written, attribute or
#: module) -> why it is here. Remove an entry with the use it describes.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("_compat.py", "frame", "_mgr"): (
        "pandas BlockManager fast path, a measured win (a tenth of a shuffle's map "
        "CPU), isolated in _compat.frame_blocks with a fallback"
    ),
    ("transport/producer.py", "self.p", "_loop"): "our own Producer's loop; the name is also Client's",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _class_privates(cls: type) -> set[str]:
    out: set[str] = set()
    for k in cls.__mro__:
        if k is object:
            continue
        out |= {n for n in vars(k) if _private(n)}
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(k)))
        except (OSError, TypeError, SyntaxError):
            continue  # a C class: vars() was all there is
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and _private(node.attr)
            ):
                out.add(node.attr)
    return out


FOREIGN_PRIVATES = set(EXTRA_FOREIGN_PRIVATES).union(*(_class_privates(c) for c in FOREIGN_CLASSES))


def _terminal(expr: ast.expr) -> str:
    """The last name in ``a.b.c`` (``c``), or ``""`` for a call, subscript, …."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return ""


def _suspect(obj: ast.expr, attr: str) -> bool:
    if isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
        return False
    return attr in FOREIGN_PRIVATES or _terminal(obj).lower() in FOREIGN_OBJECTS


def _foreign_module(module: str) -> bool:
    return module.split(".")[0] != "aimss_dask" and any(_private(p) for p in module.split("."))


def uses(tree: ast.AST) -> Iterator[tuple[str, str, int]]:
    """Suspect uses in one module: (object as written, attribute, line)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _suspect(node.value, node.attr):
            yield ast.unparse(node.value), node.attr, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and _suspect(node.args[0], node.args[1].value)
        ):
            yield ast.unparse(node.args[0]), node.args[1].value, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _foreign_module(alias.name):
                    yield IMPORT, alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _foreign_module(node.module):
                yield IMPORT, node.module, node.lineno
            elif node.module.split(".")[0] != "aimss_dask":
                for alias in node.names:
                    if _private(alias.name):
                        yield IMPORT, f"{node.module}.{alias.name}", node.lineno


def found() -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for obj, attr, line in uses(ast.parse(path.read_text(), str(path))):
            out.setdefault((rel, obj, attr), []).append(line)
    return out


def test_no_new_private_use_of_another_library() -> None:
    new = {k: v for k, v in found().items() if k not in ALLOWED}
    assert not new, (
        "private attributes of another library (use its public API, or isolate the "
        "one use in a small module and list it in ALLOWED with why): "
        + "; ".join(
            f"aimss_dask/{f}:{lines[0]} {obj}.{attr}" for (f, obj, attr), lines in sorted(new.items())
        )
    )


def test_every_allowed_use_still_exists() -> None:
    stale = sorted(set(ALLOWED) - set(found()))
    assert not stale, f"these uses are gone; remove them from ALLOWED so they cannot come back: {stale}"


def test_no_client_or_scheduler_internals_are_named_at_all() -> None:
    # Plain text, so a string, a comment or a getattr spelled any way counts too;
    # Condition's ``_waiters`` is left to the AST scan (our plugin has its own).
    banned = re.compile(r"_stream_handlers|_event_handlers|\b_broker\b")
    hits = [
        f"aimss_dask/{p.relative_to(ROOT).as_posix()}:{i}: {line.strip()}"
        for p in sorted(ROOT.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert not hits, hits


def test_the_scan_catches_what_it_is_for() -> None:
    """The patterns this test exists for are reported (a check of the checker)."""
    src = textwrap.dedent(
        """
        client._stream_handlers["x"] = f
        self.scheduler._broker.publish("t", 1)
        getattr(plugin.store._changed, "_waiters", None)
        cond._waiters
        from distributed._concurrent import x
        import dask._task_spec
        from pandas import _libs
        self._own = 1
        plugin.store.waiting
        """
    )
    got = {(obj, attr) for obj, attr, _ in uses(ast.parse(src))}
    assert got == {
        ("client", "_stream_handlers"),
        ("self.scheduler", "_broker"),
        ("plugin.store._changed", "_waiters"),
        ("cond", "_waiters"),
        (IMPORT, "distributed._concurrent"),
        (IMPORT, "dask._task_spec"),
        (IMPORT, "pandas._libs"),
    }
