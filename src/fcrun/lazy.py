"""Packages whose public names are imported on first use (PEP 562).

`import fcrun` must stay cheap for the CLI, and `fcrun.runtime` for the spawner, which imports
only the child's module: a package lists where each public name lives, and a name's module is
imported when the name is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], exports: dict[str, str]) -> tuple[
        Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of `package`, whose name -> submodule map is `exports`.

    A name read once is stored in the package's `namespace` (its globals), so later reads are
    plain attribute lookups.
    """

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return getattr_, dir_
