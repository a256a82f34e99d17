"""Waiting for the kernel or another process in root tests: poll, and fail saying what was awaited.

The kernel finishes some work in the background (a dead netns's veth, a reaped orphan) and
servers take a while to listen; a test polls for the state it needs. The bound only keeps a
broken build from hanging the suite: it is generous and never what a test checks.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(what: str, predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.02,
               detail: Callable[[], object] | None = None) -> T:
    """predicate()'s first truthy value, polled every interval_s.

    Raises:
        AssertionError: still falsy after timeout_s; the message names `what` and, if given,
            what detail() says then (a log, the last state).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"gave up waiting for {what} after {timeout_s} s"
            raise AssertionError(f"{message}: {detail()}" if detail is not None else message)
        time.sleep(interval_s)


def running(pid: int) -> bool:
    """Process `pid` runs (a zombie does not: whoever reaps it does so in its own time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def retry_until_no_oserror(what: str, call: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05) -> T:
    """call()'s result once it raises no OSError (a server not listening yet, say).

    Raises:
        AssertionError: it still raised after timeout_s; the message names `what` and the last error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"gave up waiting for {what} after {timeout_s} s: {exc!r}") from exc
        time.sleep(interval_s)


def http_get_when_up(ip: str, path: str = "/", port: int = 80, host: str = "example.test",
                     timeout_s: float = 30.0) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of GET path from ip:port once a server there answers (a container's Apache, say).

    Raises:
        AssertionError: nothing answered within timeout_s.
    """
    import http.client

    def get() -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection(ip, port, timeout=5)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
        finally:
            conn.close()

    return retry_until_no_oserror(f"a server on {ip}:{port} to answer GET {path}", get, timeout_s, interval_s=0.02)
