"""The log writer: drains an instance's stdout/stderr pipe into a RotatingLog.

Each writer is forked by this process's writer zygote (zygote.py: ~0.5 MiB of memory of its
own instead of ~3.5 MiB); if there is none, it is started as below. It runs in the cgroup of
whoever made the instance (the fork-server, or `fcrun run -d`), not
in the instance's: page cache of its writes is not charged to the instance, whose memory limit
with swap 0 would otherwise OOM-kill a busy Apache. A shell starts it in the background and
exits, so nobody has to reap it; it exits when every write end is closed (the instance's
processes are gone). If it died, the instance's writes would fail with EPIPE (SIGPIPE).

Back-pressure: the writer does not drop. A full pipe (64 KiB) blocks the instance's writes,
which throttles a flooding app to the disk's speed; the disk use stays bounded by rotation.
If the disk refuses (ENOSPC), lines are dropped and counted, never blocking the instance, and
the count is written once the disk accepts again.

    creator                      writer (host, creator's cgroup)       instance
    pipe() -> r, w
    sh -c '... &' -> exec writer(r) ----- reads r until EOF
    child's stdout/stderr = w ------------------------------------->  writes
    close r, w
"""

from __future__ import annotations

import os
import subprocess
import sys

from . import zygote
from .files import CURRENT, LogSettings, note_app

# The writer loads rotation.py alone, not the fcrun package: per instance an interpreter and
# that module (~3 MiB anonymous memory less than importing fcrun.logs).
_ROTATION_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rotation.py")
_LAUNCH = 'exec 3<&0; "$0" "$@" <&3 3<&- &'
_BOOT = ("import sys, importlib.util as u; s = u.spec_from_file_location('fcrun_log_rotation', sys.argv.pop(1)); "
         "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[1:]))")


def start_writer(directory: str, settings: LogSettings, app: str = "") -> int:
    """Make ``directory``, start a writer draining a new pipe into it; the pipe's write end.

    Resource handling: the caller owns the returned fd (O_CLOEXEC) and closes it once the
    instance holds its copies; the writer exits when the last copy closes.

    Raises:
        OSError: the directory or the pipe could not be made.
    """
    os.makedirs(directory, mode=0o750, exist_ok=True)
    if app:
        note_app(directory, app)
    # The file exists once this returns, not once the writer got going: a reader (fcrun logs,
    # a test) right after create finds it, empty.
    os.close(os.open(os.path.join(directory, CURRENT), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        if zygote.shared().fork_writer(read_fd, os.path.join(directory, CURRENT), settings.max_bytes,
                                       settings.count):
            return write_fd
        # No zygote (it could not start, or stopped answering): a writer of its own, as below.
        # -S -E: no site-packages scan, no environment: a faster start and nothing inherited.
        argv = [sys.executable, "-S", "-E", "-c", _BOOT, _ROTATION_PY, os.path.join(directory, CURRENT),
                str(settings.max_bytes), str(settings.count)]
        # Orphaned at once, so that nobody has to reap it: a shell starts it in the background
        # and exits. Not a double os.fork(): forking the fork-server (hundreds of MiB) twice
        # took ~20 ms per instance; subprocess's vfork and a shell take ~2 ms. A non-interactive
        # shell gives a background command /dev/null as stdin unless redirected: hence fd 3.
        # close_fds: nothing of the creator's (other instances' pipes, sockets) stays open in
        # the writer, so an instance's pipe reaches EOF when it exits; nor of its environment
        # (tokens, FCRUN_* settings): the writer needs none, its arguments say everything.
        launcher = subprocess.Popen(["/bin/sh", "-c", _LAUNCH, *argv], stdin=read_fd, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
                                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if launcher.wait() != 0:
            raise OSError(f"starting the log writer for {directory}: /bin/sh exited {launcher.returncode}")
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return write_fd
