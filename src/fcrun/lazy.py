"""What is imported on first use: packages' public names (PEP 562), and the logging module.

`import fcrun` must stay cheap for the CLI, and `fcrun.runtime` for the spawner, which imports
only the child's module: a package lists where each public name lives, and a name's module is
imported when the name is first read.

The container runtime's modules log only when something goes wrong (a corrupt state file, a
failed hook), and `fcrun run` without a fork-server imports them all: `logging` (with
traceback, linecache, tokenize, string) is ~4 ms of that command's ~90 on this VM. Their
module-level loggers are `Logger(__name__)` from here, which imports logging at the first message.
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


class Logger:
    """``logging.getLogger(name)`` once something is logged; until then, no logging module.

    Every attribute (warning, exception, isEnabledFor, ...) is the real logger's, so caplog
    and handlers see the same records as from ``logging.getLogger(name)``.
    """

    __slots__ = ("name", "_logger")

    def __init__(self, name: str):
        self.name = name
        self._logger = None

    def __getattr__(self, attribute: str) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return getattr(self._logger, attribute)
