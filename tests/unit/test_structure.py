"""Rules of the code's structure, checked over the whole tree (the same rules as the lead's
/work/shared/tools/structure-check.py, so that the suite keeps what a clean-up achieved):

- a private name (one leading underscore) is used only in the module that defines it: another
  module that needs it gets a public name instead;
- no test asserts a duration: a test asserts behaviour, benchmarks (bench/) measure time.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ("src", "cli")
# Attributes of these names are other objects' own business (self._x, os._exit, sys._getframe).
OWN_OR_STDLIB = frozenset({"self", "cls", "os", "sys", "ctypes", "socket", "signal"})
TIMING_ASSERT = re.compile(
    r"^\s*assert\b.*\b(\w*_(ms|s|seconds)|median\w*|elapsed\w*|took\w*)\b.*(?<![<>])[<>](?![<>])=?\s*[\d.]"
)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines itself: using one of these is not reaching into another module."""
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return defined


def private_cross_uses(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """`path:line imports _x` / `path:line uses ._x` for each private name of another module."""
    tree = ast.parse(path.read_text(), str(path))
    defined = _defined_names(tree)
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (node.level or node.module.startswith("fcrun")):
            found += [f"{where}:{node.lineno} imports {alias.name}" for alias in node.names if _private(alias.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in defined:
            if not (isinstance(node.value, ast.Name) and node.value.id in OWN_OR_STDLIB):
                found.append(f"{where}:{node.lineno} uses .{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    modules = sorted(p for top in SOURCES for p in (ROOT / top).rglob("*.py"))
    assert len(modules) > 50, f"found only {len(modules)} modules under {SOURCES}: wrong root {ROOT}?"
    found = [use for p in modules for use in private_cross_uses(p)]
    assert found == [], "private names used outside their module (give them a public name):\n" + "\n".join(found)


def timing_asserts(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if TIMING_ASSERT.search(line) and "cpu_seconds" not in line]


def test_no_test_asserts_a_duration():
    found = [hit for p in sorted((ROOT / "tests").rglob("*.py")) for hit in timing_asserts(p)]
    assert found == [], "tests asserting a duration (measure it in bench/ instead):\n" + "\n".join(found)


# Each check on an example: what it must find, and what it must leave alone.
PRIVATE_USE_EXAMPLE = (
    "from fcrun.runtime.child import _fail, public\n"
    "from .spawner import _child_main\n"
    "from os import _exit\n"  # not fcrun's
    "def _mine(): pass\n"
    "class C:\n"
    "    def f(self, rt):\n"
    "        self._own = 1\n"
    "        rt._own, _mine(), os._exit\n"
    "        return rt._cgroup(rt._state)\n"
)
TIMING_EXAMPLE = (
    "assert build_s < 10\n"
    "    assert statistics.median(timings_ms['attach']) < 20\n"
    "assert elapsed <= 0.5\n"
    "assert quota_us == 60000\n"
    "assert len(items) < 10\n"
    "assert x << 2\n"
)


@pytest.mark.parametrize("check,source,expected", [
    (private_cross_uses, PRIVATE_USE_EXAMPLE,
     ["x.py:1 imports _fail", "x.py:2 imports _child_main", "x.py:9 uses ._cgroup", "x.py:9 uses ._state"]),
    (timing_asserts, TIMING_EXAMPLE, ["x.py:1", "x.py:2", "x.py:3"]),
], ids=["private names", "timing asserts"])
def test_each_check_finds_what_it_should(tmp_path, check, source, expected):
    example = tmp_path / "x.py"
    example.write_text(source)
    assert check(example, tmp_path) == expected
