"""The container runtime: an OCI spec in, a running container out (the part runc's and
youki's libcontainer play).

    spec.py          the OCI runtime spec as typed structs, its decoding and validation
    options.py       `fcrun run`'s options -> a Spec (RunOptions, spec_from_image)
    plan.py          Spec -> ChildPlan: every step the child takes, decided before the fork
    child.py         what runs in the new process between fork and exec (the plan's steps)
    spawner.py       a small single-threaded process that forks children for the library
    userns.py        host id ranges and user namespaces; capabilities.py, sealed.py (init)
    state.py         state.json on disk: the container's lifecycle states and transitions
    lifecycle.py     Runtime: create, start, kill, freeze, update, delete, exec, gc
    criu.py          checkpoint/restore, where the kernel and CRIU allow

Public names are imported on first use (PEP 562): the spawner imports `fcrun.runtime.child`
and must not pay for the rest.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Container": "lifecycle", "ContainerInfo": "lifecycle", "Runtime": "lifecycle",
    "limits_from_spec": "lifecycle", "require_root": "lifecycle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fcrun.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
