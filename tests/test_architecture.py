"""Commands are the library's users, never each other's: the import graph of the wellocr package.

A command is a module run as `python -m wellocr.X` that does one job for a user (COMMANDS); its `main()` parses
arguments and calls library modules (wellocr.inference, wellocr.artifacts, wellocr.ledger, wellocr.cli, ...), which
hold the work. So no module imports a command: a command imported by another drags its argument handling and its
imports along, and the work it holds cannot be found where the next command looks for it. And the graph has no
cycle, so every module can be read, tested and imported on its own.

`wellocr.config` also has a `main()` (`python -m wellocr.config` prints the config reference or a resolved config),
but it is the config schema that every module reads its settings from, not a job of its own: its CLI only renders
the schema. It is a library here; a module other than config that grows a `__main__` block must be added to
COMMANDS (or become a library).

Imports are read from the source (ast), wherever they are: module level, inside functions (the lazy imports that
keep torch out of quick commands) and under `if TYPE_CHECKING:` all count.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wellocr"
PACKAGE_NODE = "wellocr"  # `from wellocr import __version__`: the package's __init__

# Modules run as `python -m wellocr.X` for a user's job. drill and prepare are named ahead of their modules.
COMMANDS = frozenset({"train", "evaluate", "predict", "export", "compare", "cost", "synth", "drill", "prepare",
                      "rank"})
LIBRARIES_WITH_A_CLI = frozenset({"config"})  # see the module docstring

KNOWN_EXCEPTIONS: frozenset = frozenset()  # (importer, command) pairs allowed for now: none


def modules() -> dict[str, Path]:
    return {path.stem if path.stem != "__init__" else PACKAGE_NODE: path for path in sorted(PACKAGE.glob("*.py"))}


def wellocr_imports(source: str, known: set[str]) -> set[str]:
    """The wellocr modules `source` imports anywhere in it (`known`: the package's module names)."""
    found: set[str] = set()

    def add(dotted: str, names: list[str] = ()) -> None:
        parts = dotted.split(".")
        if parts[0] != "wellocr":
            return
        if len(parts) > 1:
            found.add(parts[1])
            return
        found.update(name if name in known else PACKAGE_NODE for name in names or [""])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative: from . import x / from .x import y, inside the package
                add("wellocr" + (f".{node.module}" if node.module else ""), names)
            elif node.module:
                add(node.module, names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module name -> the wellocr modules it imports (itself left out)."""
    known = set(modules())
    return {name: _imports_of(path, frozenset(known)) - {name} for name, path in modules().items()}


@functools.cache
def _imports_of(path: Path, known: frozenset[str]) -> set[str]:
    return wellocr_imports(path.read_text(encoding="utf-8"), set(known))


def has_main_block(path: Path) -> bool:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package has a few dozen modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(cycle_through(graph, component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def edges_into_commands(commands_only: bool) -> list[str]:
    """`a -> b` for every import of a command b by a command (commands_only) or by a library, less the exceptions."""
    return sorted(f"wellocr.{a} -> wellocr.{b}" for a, targets in import_graph().items() for b in targets
                  if b in COMMANDS and (a in COMMANDS) == commands_only and (a, b) not in KNOWN_EXCEPTIONS)


# ---------------------------------------------------------------- the rules


def test_no_command_imports_another_command():
    assert edges_into_commands(commands_only=True) == [], (
        "a command imports another command: move what it needs into a library module (wellocr.inference, "
        "wellocr.artifacts, wellocr.ledger, wellocr.cli, ...) and import it from there in both")


def test_no_library_imports_a_command():
    assert edges_into_commands(commands_only=False) == [], (
        "a library module imports a command: the work it needs belongs in a library module")


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_every_module_run_as_a_command_is_known_as_one():
    mains = {name for name, path in modules().items() if has_main_block(path)}
    assert mains - COMMANDS - LIBRARIES_WITH_A_CLI == set(), "a new command: add it to COMMANDS"


def test_the_thin_commands_import_no_command():
    """The commands this layering was made for stay clean whatever the exceptions say."""
    graph = import_graph()
    for command in ("evaluate", "predict", "export", "compare", "cost"):
        assert graph[command] & COMMANDS == set(), command


# ---------------------------------------------------------------- the reader itself


KNOWN = {"data", "model", "errors", "config", "ledger"}


@pytest.mark.parametrize("source, expected", [
    ("import wellocr.data", {"data"}),
    ("import wellocr.data as d", {"data"}),
    ("from wellocr.model import Backend", {"model"}),
    ("from wellocr import errors, __version__", {"errors", PACKAGE_NODE}),
    ("from . import config", {"config"}),
    ("from .ledger import CostLedger", {"ledger"}),
    ("def f():\n    from wellocr.data import load_splits\n", {"data"}),
    ("class C:\n    def m(self):\n        import wellocr.model\n", {"model"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wellocr.config import Config\n", {"config"}),
    ("import importlib\nimportlib.import_module('wellocr.ledger')", {"ledger"}),
    ("import json, os\nfrom pathlib import Path", set()),
])
def test_imports_are_found_wherever_they_are(source, expected):
    assert wellocr_imports(source, KNOWN) == expected


def test_a_cycle_is_reported_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
