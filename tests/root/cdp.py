"""A tiny Chrome DevTools Protocol client over --remote-debugging-pipe, for the dashboard's
browser tests: headless Chromium (Debian's `chromium`) with a throw-away profile, driven
without a websocket library or playwright.

The pipe: Chromium reads commands from its fd 3 and writes replies and events to its fd 4,
each a JSON object followed by a NUL byte. One page target, attached with flatten=True, so
page commands carry its sessionId on the same pipe.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import struct
import tempfile
import time
import zlib
from typing import Any

# Debian's /usr/bin/chromium is a shell launcher that adds flags of /etc/chromium.d (an
# extension to load, a /dev/shm check that fails in a VM); the browser itself is run directly.
CHROMIUM_BINARIES = ("/usr/lib/chromium/chromium",)
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    found = next((path for path in CHROMIUM_BINARIES if os.access(path, os.X_OK)), None)
    return found or next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _pipe_above(fd: int) -> tuple[int, int]:
    """A pipe whose ends are above `fd`, so that moving them onto fds 3 and 4 in the child
    cannot close one of them first (as `3<&3 3<&-` would)."""
    r, w = os.pipe()
    try:
        return fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, fd + 1), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, fd + 1)
    finally:
        os.close(r)
        os.close(w)


class CdpError(Exception):
    """Chromium answered a command with an error, or went away."""


class Browser:
    """Headless Chromium with one page. Use as a context manager.

    Resource handling: the browser process and its temporary profile directory are the
    Browser's; `close()` kills the one and removes the other, also after a failed start.
    """

    def __init__(self, width: int = 1280, height: int = 900):
        self.width, self.height = width, height
        self.proc: subprocess.Popen | None = None
        self.profile = tempfile.mkdtemp(prefix="fcrun-chromium-")
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []  # events read while waiting for replies
        self.exceptions: list[str] = []  # uncaught JavaScript exceptions of the page, as text
        self.session: str | None = None
        self._log = open(os.path.join(self.profile, "chromium.log"), "wb")  # stderr, for a failure message

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        chromium = find_chromium()
        if chromium is None:
            raise CdpError("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
        to_browser_r, self._to_browser = _pipe_above(4)
        self._from_browser, from_browser_w = _pipe_above(4)
        args = [chromium, "--headless=new", "--no-sandbox",  # root: Chromium's sandbox refuses to run as root
                "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                f"--window-size={self.width},{self.height}", "about:blank"]
        # The pipe must be the child's fds 3 and 4: moved there by bash (dash takes one-digit fds
        # only), which then execs the browser.
        shell = f"exec 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-; exec \"$@\""
        try:
            # Its home is the profile too: Chromium writes crash-report settings and dconf's cache
            # under $HOME/.config and $HOME/.cache whatever --user-data-dir says.
            home = {"HOME": self.profile, "XDG_CONFIG_HOME": os.path.join(self.profile, ".config"),
                    "XDG_CACHE_HOME": os.path.join(self.profile, ".cache")}
            self.proc = subprocess.Popen(["bash", "-c", shell, "bash", *args], pass_fds=(to_browser_r, from_browser_w),
                                         stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
                                         env={**os.environ, **home})
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page("Performance.enable")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._send({"id": self._new_id(), "method": "Browser.close"})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            # The browser's own session and process group (start_new_session): whatever of its
            # renderers and helpers is left dies with it.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in ("_to_browser", "_from_browser"):
            if hasattr(self, fd):
                os.close(getattr(self, fd))
                delattr(self, fd)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    # -- the protocol --------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _read_message(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise CdpError(f"no message from chromium within {timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise CdpError(f"chromium closed its pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        """Send a command and return its result (events that come first are kept in `events`).

        Raises:
            CdpError: the command failed, or no answer came within timeout_s.
        """
        message: dict[str, Any] = {"id": self._new_id(), "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._send(message)
        while True:
            reply = self._read_message(timeout_s)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._note(reply)

    def _note(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["method"] == "Runtime.exceptionThrown":
            details = event["params"]["exceptionDetails"]
            self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", "?"))

    def page(self, method: str, timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, timeout_s, **params)

    # -- what the tests do -----------------------------------------------------------------------

    def navigate(self, url: str, timeout_s: float = 30) -> None:
        """Load `url` and wait for its load event."""
        self.events.clear()
        self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError(f"{url} did not load within {timeout_s} s")
            message = self._read_message(left)
            if "method" in message:
                self._note(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise).

        Raises:
            CdpError: it threw.
        """
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20, what: str = "") -> Any:
        """Evaluate `expression` until it is truthy; its value.

        Raises:
            CdpError: it never was within timeout_s.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CdpError(f"never true within {timeout_s} s: {what or expression}")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        """A PNG of the page as it is shown."""
        return base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])


def png_colours(png: bytes) -> int:
    """How many distinct colours a PNG holds (8-bit RGB or RGBA, not interlaced: what
    Page.captureScreenshot makes). A blank page has one; a page with text and charts, hundreds.

    Raises:
        ValueError: another kind of PNG.
    """
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}, interlace {interlace}")
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        _unfilter(kind, row, previous, bpp)
        colours.update(bytes(row[i:i + bpp]) for i in range(0, stride, bpp))
        previous = row
    return len(colours)


def _unfilter(kind: int, row: bytearray, prior: bytearray, bpp: int) -> None:
    """Undo one scanline's PNG filter in place (RFC 2083 section 6)."""
    if kind == 0:
        return
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = prior[i]
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + up) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + ((left + up) >> 1)) & 0xFF
        elif kind == 4:
            upper_left = prior[i - bpp] if i >= bpp else 0
            p = left + up - upper_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
            predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
            row[i] = (row[i] + predictor) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter {kind}")
