"""A process that pays a cgroup move's RCU grace period while a creation does other work.

Needed only where a creation moves its child (cgroup v2, and a creation with hooks before
"J"): on v1 the child joins its groups itself through their `tasks` files, which waits for no
grace period (v1.py), so neither the fork-server nor `fcrun run` starts a primer there.

A move into a cgroup takes the kernel's cgroup_threadgroup_rwsem for writing, and the first
writer after a quiet spell waits for an RCU grace period; writers within about one grace period
after the last one do not (bench/cgroup_move.py: 4.8 ms p50 and 12 ms p99 alone, 0.12 ms right
after another move). A serve's starts are seconds apart, so each start's move waited in full:
10.5 ms of the fork-server's 23 (bench/README.md, "Start from nothing").

So the fork-server keeps a primer: a small child of its own, in a group of its own beneath the
cgroup parent (``fcrun-move-primer-<owner pid>___...``, padded with "_" beyond 128
characters, the longest container name, so that it is never a container's group). `prime()` (a byte on a pipe, at the start
of every creation) wakes it, and for PRIME_FOR_S it moves itself into its own group every
PRIME_EVERY_S: "0" written to that group's cgroup.procs, a move of nothing (it is already
there) that still takes the semaphore. Its first write pays the grace period beside the
creation's user namespace, mounts and forks; the creation's own move, some 10 ms later, finds
the semaphore's fast path. Moving itself ("0") names no pid, so no pid reuse can make it move
anyone else, and it touches no group but its own.

A creation's own work before its move is short (~3 ms in a library process, `--net none`),
shorter than the grace period (~12 ms there), so a primer woken only at the creation hides part
of it. `fcrun run` without a fork-server starts one *primed* (``primed=True``) before it imports
the runtime (cli/run_here.py): its first write, which moves it into its group, pays the grace
period while the ~20 ms of imports go on, and the container's move is a follow-up
(bench/README.md, "Issue 17: `fcrun run` without a fork-server, second pass").

What it costs: one forked process per fork-server (its memory shared with the fork-server's,
copy-on-write) and, during a creation, ~25 writes that each hold forks and exits on the host
back for microseconds (as any move does). Without a primer (it died, or could not be made)
creations go on as before: `prime()` never raises.

Resource handling: `close()` ends the primer (SIGKILL through a pidfd; PR_SET_PDEATHSIG should
its owner die first), reaps it and removes its group; `remove_stale` removes the groups of primers
that are gone (an empty group: its primer died with a killed fork-server).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from .. import syscalls as sc
from ..errors import FcrunError
from ..lazy import Logger
from .base import Cgroup, CgroupDriver
from .limits import Limits

PRIME_FOR_S = 0.05  # a creation's move comes ~10 ms after its start; a fork-server's creation takes ~20 ms
PRIME_EVERY_S = 0.002  # well within a grace period (~5 ms here), so the fast path never lapses
GROUP_PREFIX = "fcrun-move-primer-"
GROUP_NAME_LEN = 130  # longer than any container name (128: runtime/state.py), so never a container's

log = Logger(__name__)


def group_name(owner_pid: int) -> str:
    """The group of the primer of process `owner_pid` (a fork-server, or `fcrun run`)."""
    return f"{GROUP_PREFIX}{owner_pid}".ljust(GROUP_NAME_LEN, "_")


def is_group_name(name: str) -> bool:
    """Is `name` a primer's group (group_name's form)? Never true of a container's group."""
    head = name.rstrip("_")
    return len(name) == GROUP_NAME_LEN and head.startswith(GROUP_PREFIX) and head[len(GROUP_PREFIX):].isdigit()


class MovePrimer:
    """The primer process and its group (see the module's docstring)."""

    def __init__(self, driver: CgroupDriver, *, primed: bool = False):
        """Start the primer. Call it while the process has no other thread (it forks).

        `primed`: it primes at once, for PRIME_FOR_S, its first write moving it into its group
        (so this call waits for no grace period); else it is moved in here and waits for prime().

        Raises:
            FcrunError, OSError: the group could not be made, or the fork failed; nothing is left.
        """
        self.cgroup: Cgroup = driver.create(group_name(os.getpid()), Limits())
        procs = self.cgroup.procs_files()[0]
        cmd_r, self._cmd_w = os.pipe2(os.O_CLOEXEC)
        self.pid = self._pidfd = -1
        try:
            self.pid = os.fork()
            if self.pid == 0:  # pragma: no cover - the primer itself, until _exit
                _primer_main(cmd_r, procs, primed)
            # A pidfd: close() kills it by this, never by a pid that a fork-server's reaping
            # (waitpid(-1)) may have freed for another process.
            self._pidfd = os.pidfd_open(self.pid)
            if not primed:
                # In its group from the start: a group without a process is a dead primer's (remove_stale).
                self.cgroup.add(self.pid)
        except BaseException:
            os.close(self._cmd_w)  # the primer, if any, is killed and reaped by _end
            self._cmd_w = -1
            self._end()
            self.cgroup.destroy()
            raise
        finally:
            os.close(cmd_r)
        os.set_blocking(self._cmd_w, False)

    def prime(self) -> None:
        """Have the primer take the semaphore for the next PRIME_FOR_S. Never raises."""
        if self._cmd_w < 0:
            return
        try:
            os.write(self._cmd_w, b"p")
        except BlockingIOError:
            pass  # bytes are waiting already: it is priming
        except OSError as exc:  # EPIPE: it died; creations go on unprimed
            log.warning("move primer %d is gone (%s): cgroup moves are no longer primed", self.pid, exc)
            os.close(self._cmd_w)
            self._cmd_w = -1

    def close(self) -> None:
        """End the primer (killed: it may be within a priming spell, up to PRIME_FOR_S), wait
        for it, remove its group."""
        if self._cmd_w >= 0:
            os.close(self._cmd_w)
            self._cmd_w = -1
        self._end()
        self.cgroup.destroy()

    def _end(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):  # dead already (and reaped, maybe)
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.pid > 0:
            with contextlib.suppress(ChildProcessError):  # reaped by the fork-server's loop
                os.waitpid(self.pid, 0)


def remove_stale(driver: CgroupDriver) -> list[str]:
    """Remove primer groups without a process (their fork-server was killed; its primer died
    with it). Returns their names. A live primer's group is left alone (another fork-server's)."""
    parent = os.path.dirname(driver.paths_for(group_name(0))[driver.keys[0]])
    try:
        names = [n for n in os.listdir(parent) if is_group_name(n)]
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        cgroup = driver.load(driver.paths_for(name))
        try:
            if cgroup.pids():
                continue
            cgroup.destroy()
        except (FcrunError, OSError) as exc:
            log.warning("cannot remove stale move primer group %s: %s", name, exc)
            continue
        removed.append(name)
    return removed


def _primer_main(cmd_r: int, procs: str, primed: bool) -> None:  # pragma: no cover - runs in the forked child
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        # No fd of its owner's but its pipe: a reader of the owner's stdout or stderr (a shell's
        # `$(fcrun run ...)`) must see EOF when the owner exits, whatever this process does.
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            if null != std:
                os.dup2(null, std)
        os.closerange(3, cmd_r)
        os.closerange(cmd_r + 1, os.sysconf("SC_OPEN_MAX"))
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        while primed or os.read(cmd_r, 64):  # EOF: the owner closed it, or is gone
            primed = False
            until = time.monotonic() + PRIME_FOR_S
            while time.monotonic() < until:
                with contextlib.suppress(OSError):  # its group removed under it, say: priming stops working, nothing more
                    os.write(fd, b"0")  # itself, into its own group
                time.sleep(PRIME_EVERY_S)
    finally:
        os._exit(0)
