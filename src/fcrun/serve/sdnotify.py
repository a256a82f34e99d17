"""systemd's readiness protocol (sd_notify(3)), spoken natively: one datagram to $NOTIFY_SOCKET.

No library: the protocol is a newline-separated ``KEY=VALUE`` datagram on a unix socket whose
path is in the environment; a leading ``@`` names a Linux abstract socket (the ``@`` becomes a
NUL byte). Without $NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a
no-op, so serve behaves the same outside systemd.

What serve sends (server.py)::

    READY=1                      once the proxy and the admin API listen
    RELOADING=1 MONOTONIC_USEC=  SIGHUP received, reading the file   --> READY=1 when done
    STOPPING=1                   SIGTERM/SIGINT: draining
    WATCHDOG=1                   every WATCHDOG_USEC/2 when the unit sets WatchdogSec
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fcrun.serve")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


class Notifier:
    """Sends sd_notify messages to `address` (default: $NOTIFY_SOCKET); a no-op without one.

    A failed send is logged once and never raised: serve must not stop because systemd went away.
    """

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get(NOTIFY_SOCKET_ENV, "")
        self.address: str | bytes | None = _socket_address(address) if address else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (keys upper-cased). Returns True if sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify: send %r to %s: %s", message.decode(), _shown(self.address), exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) tell this reload from an older one.
        return self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> bool:
        return self.send(stopping=1, status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)


def watchdog_interval_s(environ=os.environ) -> float | None:
    """Half of WATCHDOG_USEC (systemd's advice), or None when no watchdog is asked of this
    process (unset, zero, or WATCHDOG_PID naming another process)."""
    usec = environ.get(WATCHDOG_USEC_ENV, "")
    pid = environ.get(WATCHDOG_PID_ENV, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # Linux abstract namespace
    return address


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
