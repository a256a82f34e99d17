"""The log lines of fcrun's own daemons (serve, the fork-server): a level and an RFC3339
timestamp on every line, as text or JSON; and serve's access log, one line a request (off by
default).

The format is chosen once at start (``--log-format`` or FCRUN_LOG_FORMAT; level from FCRUN_LOG).
The access log is a logger of its own, ``fcrun.access``, fed by Manager's ``access_log`` hook:
with it off the hook is None and a request pays one ``is None`` test.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

FORMATS = ("text", "json")
LOG_FORMAT_ENV = "FCRUN_LOG_FORMAT"
ACCESS_LOGGER = "fcrun.access"


def _stamp(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1e6):06d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-05T10:30:00.123456Z INFO fcrun serve: message``"""

    def __init__(self, who: str):
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record.created)} {record.levelname} {self.who}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, msg, and an access line's fields."""

    def __init__(self, who: str):
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": _stamp(record.created), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        fields = getattr(record, "access", None)
        if fields is not None:
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def configure(log_format: str, who: str, level: str = "INFO") -> None:
    """Send the root logger's records to stderr in ``log_format``, each with ``who``.

    Raises:
        ValueError: an unknown format or level, naming it.
    """
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(TextFormatter(who) if log_format == "text" else JsonFormatter(who))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class AccessLog:
    """One line per finished request, in serve's log format, on serve's log stream.

    Not through ``logging``: a LogRecord, its formatter and a flush per line cost ~30 us a
    request (bench/access_log_cost.py). Lines are formatted directly (the timestamp's seconds
    part cached per second) and written in batches: at BATCH_LINES lines, or by ``flush()``,
    which serve's tick calls every TICK_INTERVAL_S, so a line waits at most that long.
    """

    BATCH_LINES = 256

    def __init__(self, log_format: str = "text", write: Callable[[str], object] | None = None,
                 flush: Callable[[], object] | None = None, clock: Callable[[], float] = time.time):
        self.json = log_format == "json"
        self._write = write or sys.stderr.write
        self._flush = flush or sys.stderr.flush
        self.clock = clock
        self.pending: list[str] = []
        self._second = -1
        self._second_text = ""

    def _stamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def __call__(self, app: str, instance: str, status: int, duration_s: float,
                 cold: tuple[str, float] | None, failed: bool) -> None:
        stamp = self._stamp(self.clock())
        duration_ms = round(duration_s * 1000, 2)
        if self.json:
            line = json.dumps({"time": stamp, "level": "info", "logger": ACCESS_LOGGER, "msg": "access", "app": app,
                               "instance": instance, "status": status, "duration_ms": duration_ms,
                               "cold_start": cold[0] if cold else None, "cold_start_ms": cold[1] if cold else None,
                               "failed": failed}, separators=(",", ":"))
        else:
            cold_text = f" cold={cold[0]}:{cold[1]}ms" if cold else ""
            line = (f"{stamp} INFO fcrun serve: access app={app} instance={instance} status={status} "
                    f"duration_ms={duration_ms:.2f}{cold_text}{' failed' if failed else ''}")
        self.pending.append(line)
        if len(self.pending) >= self.BATCH_LINES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            text = "\n".join(self.pending) + "\n"
            self.pending.clear()
            self._write(text)
            self._flush()
