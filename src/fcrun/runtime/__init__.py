"""The container runtime: an OCI spec in, a running container out (the part runc's and
youki's libcontainer play).

    spec.py          the OCI runtime spec as typed structs, its decoding and validation
    options.py       `fcrun run`'s options -> a Spec (RunOptions, spec_from_image)
    plan.py          Spec -> ChildPlan (every step the child takes) and cgroup Limits
    state.py         state.json on disk; the lifecycle table (ALLOWED, check_allowed)
    lifecycle.py     Runtime: the entry point (create, run, kill, freeze, update, delete, gc)
    creation.py      create's steps, each with its undo (validate, reserve, ... record)
    container.py     Container (start, wait) and ContainerInfo (a row of `fcrun ps`)
    process.py       who forks the child (here or the spawner), the handshake, the waits
    child.py         what runs in the new process between fork and exec (the plan's steps)
    rootfs_setup.py  the child's mounts: rootfs, /dev, masks, cgroup mount, pivot_root
    fork.py          the parent's side: forking the child (pid 1 or not), its handshake messages
    console.py       the process's terminal, made in the container (runc's --console-socket)
    passwd.py        HOME from the container's /etc/passwd when the process has none
    spawner/         a small single-threaded process that forks children for the library:
                     protocol.py (wire, re-checks), server.py (the process), client.py
    exec.py          exec into a running container
    slots.py         a directory in a container filled with a host directory, live
    storage.py       the writable layers on disk and the shared rootfs mount point
    userns.py        host id ranges and mappings; holder.py makes the namespace itself
    capabilities.py, sealed.py (pid 1's init as a sealed memfd), criu.py (checkpoint)

Public names are imported on first use (PEP 562): the spawner imports `fcrun.runtime.child`
and must not pay for the rest.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Container": "container", "ContainerInfo": "container", "Runtime": "lifecycle",
    "limits_from_spec": "plan", "require_root": "lifecycle",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
