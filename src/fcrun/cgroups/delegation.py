"""A cgroup v2 subtree that systemd delegated to fcrun (`Delegate=yes`), with fcrun's own
process in a ``supervisor`` leaf of it, so that the subtree can hand controllers down.

Why: on cgroup v2 a cgroup that holds processes cannot enable controllers for its children
(the "no internal processes" rule). systemd starts `fcrun serve` in the unit's own cgroup
(``.../fcrun.service``); fcrun's groups go beneath it and need cpu, memory and pids enabled in
its cgroup.subtree_control, which the kernel refuses (EBUSY) while serve itself is in there.
systemd's answer for a delegated unit (its CGROUP_DELEGATION.md) is that the manager moves its
main process into a child cgroup, a ``supervisor/`` beside its payloads; systemd >= 254 can do
it at start (``DelegateSubgroup=supervisor``). Either way serve ends up in
``<unit>/supervisor``, and the unit's cgroup, now an inner node, is the base of fcrun's groups:
`detect()` recognises that layout (`delegated_base`) and may then enable controllers in the
base's subtree_control, which a delegated subtree's owner is meant to write.

A cgroup counts as delegated only when systemd marked it: its ``trusted.delegate`` extended
attribute (``user.delegate`` for a user manager's units) is "1" (systemd >= 251). Nothing else
is moved or written: not a cgroup fcrun was merely started in (a login session's scope, a
container's root), and not a delegated one that other processes share with us.
"""

from __future__ import annotations

import errno
import posixpath

from ..errors import KernelError
from .base import CGROUP_PROCS
from .kernel import KernelIO, parse_pids

SUPERVISOR = "supervisor"  # the leaf fcrun's own processes run in (systemd's suggested name)
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")


def is_delegated(cgroup_dir: str, io: KernelIO) -> bool:
    """Whether systemd marked ``cgroup_dir`` as delegated (the xattr is "1")."""
    return any(io.getxattr(cgroup_dir, name) == b"1" for name in DELEGATE_XATTRS)


def delegated_base(own_dir: str, io: KernelIO) -> str | None:
    """The delegated cgroup whose ``supervisor`` leaf fcrun runs in (``own_dir``), or None."""
    if posixpath.basename(own_dir) != SUPERVISOR:
        return None
    parent = posixpath.dirname(own_dir)
    return parent if is_delegated(parent, io) else None


def enter_supervisor(own_dir: str, pid: int, io: KernelIO) -> str | None:
    """Move process ``pid`` (with its threads) from the delegated cgroup ``own_dir`` into
    ``own_dir/supervisor``, when ``own_dir`` is delegated and holds no other process. Returns
    the supervisor's dir, or None when there was nothing to do (not delegated, already a
    supervisor, or shared with other processes: `detect()` then names what is missing).

    Raises:
        KernelError: the mkdir or the move failed (the dir made here is removed again).
    """
    if delegated_base(own_dir, io) is not None or not is_delegated(own_dir, io):
        return None
    if parse_pids(io.read(posixpath.join(own_dir, CGROUP_PROCS))) != [pid]:
        return None
    supervisor = posixpath.join(own_dir, SUPERVISOR)
    made = False
    try:
        io.mkdir(supervisor)
        made = True
    except KernelError as exc:
        if exc.errno != errno.EEXIST:  # a supervisor left by an earlier run of the unit: reused
            raise
    try:
        io.write(posixpath.join(supervisor, CGROUP_PROCS), str(pid))
    except KernelError:
        if made:
            io.rmdir(supervisor)
        raise
    return supervisor
