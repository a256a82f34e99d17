"""serve's own log lines (level, timestamp, text/JSON) and the access log hook on Manager."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from fcrun.logs.serverlog import AccessLog, JsonFormatter, TextFormatter, configure
from test_manager import cmdb, make  # noqa: F401 - the fixture and the Manager factory


def record(msg="hello %s", args=("world",), name="fcrun.serve", level=logging.WARNING, created=1.5, **extra):
    r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    r.created = created
    r.__dict__.update(extra)
    return r


def test_text_lines_carry_timestamp_level_and_who():
    assert TextFormatter("fcrun serve").format(record()) == "1970-01-01T00:00:01.500000Z WARNING fcrun serve: hello world"


def test_json_lines_are_one_object_with_access_fields():
    doc = json.loads(JsonFormatter("fcrun serve").format(record(access={"app": "a.test", "status": 200})))
    assert doc == {"time": "1970-01-01T00:00:01.500000Z", "level": "warning", "logger": "fcrun.serve",
                   "msg": "hello world", "app": "a.test", "status": 200}


def test_configure_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="--log-format 'xml'"):
        configure("xml", "fcrun serve")


def test_the_access_log_gets_one_line_per_request_with_the_cold_start_path(cmdb):  # noqa: F811
    written = []
    access = AccessLog("json", write=written.append, flush=lambda: None, clock=lambda: 1.5)

    async def main():
        manager, backend, clock, _ = make(cmdb)
        manager.access_log = access
        cold = await manager.acquire("example.test")
        clock.now += 0.004
        cold.done(200, 10, 100, False)
        hot = manager.acquire_nowait("example.test")
        hot.done(503, 0, 0, True)
        manager.access_log = None  # off: leases made now do not log
        manager.acquire_nowait("example.test").done(200, 0, 0, False)
        assert manager.stats()["example.test"].requests == 3  # metering is unchanged either way

    asyncio.run(main())
    assert written == []  # batched until a flush (serve's tick) or BATCH_LINES
    access.flush()
    docs = [json.loads(line) for line in "".join(written).splitlines()]
    assert [(d["app"], d["instance"], d["status"], d["cold_start"], d["failed"]) for d in docs] == [
        ("example.test", "example.test-0", 200, "start", False),
        ("example.test", "example.test-0", 503, None, True)]
    assert docs[0]["duration_ms"] == 4.0 and docs[0]["time"] == "1970-01-01T00:00:01.500000Z"


def test_text_access_lines_and_batching():
    written = []
    access = AccessLog("text", write=written.append, flush=lambda: None, clock=lambda: 1.5)
    access("a.test", "a-1", 200, 0.0012, ("pool", 3.5), False)
    access.flush()
    assert written == ["1970-01-01T00:00:01.500000Z INFO fcrun serve: access app=a.test instance=a-1 status=200 "
                       "duration_ms=1.20 cold=pool:3.5ms\n"]
    for _ in range(AccessLog.BATCH_LINES):
        access("a.test", "a-1", 200, 0.001, None, False)
    assert len(written) == 2 and written[1].count("\n") == AccessLog.BATCH_LINES
