#!/usr/bin/env python3
"""The talk's experiment (FastContainer, IOT38, 2017): scaling an Apache/PHP site under load.

An apache-php app serving phpinfo() at --cpu 0.3 --memory 512M behind a real `fcrun serve`
(a subprocess on private state roots, cgroup parent, bridge and subnet, listening on
127.0.0.1). A client in this process sends N GET / requests at a fixed concurrency over
keep-alive connections and records each one's response time by index. At request N/2, by
--mode:

  scale-out  a second instance (`POST /apps/NAME/scale {"instances": 2}`)
  scale-up   twice the CPU, live (`{"cpu": 0.6}`)
  reactive   no forced action: the app has autoscale on, a ceiling of 0.6 CPU and at most 2
             instances, and the policy decides. So that there is a moment of overload to
             react to, the first half is sent at a steady rate that one instance at 0.3 CPU
             handles (--base-share of what it served in the warm-up); at N/2 the client
             switches to the full fixed concurrency of the other modes.

Before the N requests, a warm-up (not recorded) starts the instance and measures what one
instance at 0.3 CPU serves (the reactive mode's pace). In every mode the app starts with
autoscale off; reactive mode turns it on after the warm-up. The image's Apache forks its 128
workers at start and keeps them (rootfs/apache-php/fcrun.conf): with Debian's prefork defaults
it reaped idle workers during the reactive mode's quiet first half, and the burst then waited
in the accept queue for seconds.

Concurrency (default 96): a CFS quota of 0.3 CPU lets the instance run 30 ms of every 100 ms
period, about 60-70 phpinfo() requests on this machine. With fewer requests in flight than
that, most of them finish inside the burst and only those caught by the throttle wait ~70 ms,
so the median hardly moves when capacity is added; with more, every request queues, as in the
talk's figures, and response time follows capacity. The client shares the machine with the
proxy and the containers (about 50 us of client CPU and 100 us of serve CPU per request), so
the after-phase figures also carry that competition.

Output: JSON with, per mode, the before/after phases (p50/p90/p99 ms, throughput), the 1,000
requests around the switch, failures (non-2xx, resets, timeouts), the time from the action (in
reactive mode: from the overload) to the first request served by the new capacity, the
scaling events, and a PNG plot of response time against request index (its path is printed).
Which instance served a request is read from phpinfo's "System" row (the container's hostname).

All traffic goes to 127.0.0.1 and the containers this run made; everything it made (serve,
containers, cgroups, bridge, state) is removed at the end, also on failure or Ctrl-C. Needs
root, the apache-php image (built when missing: `fcrun image build apache-php`) and, for the
plot, matplotlib (`pip install fcrun[bench]`; without it the JSON is still written).

Usage: bench/paper.py [--mode scale-out|scale-up|reactive|all] [--requests 100000]
                      [--concurrency 8] [--out bench/results] [--image-store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import percentile, preflight  # noqa: E402

APP = "paper.test"
MODES = ("scale-out", "scale-up", "reactive")
CPU = 0.3
CPU_MAX = 0.6
MEMORY = "512M"
SUBNET = "10.235.0.0/24"
# A bursty app forks all its Apache workers at start (the image's default is 8, for density):
# see rootfs/apache-php/fcrun.conf.
PAPER_ENV = ["APACHE_START_SERVERS=128", "APACHE_MIN_SPARE_SERVERS=16"]
REQUEST_TIMEOUT_S = 30.0
SWITCH_WINDOW = 1000  # requests around N/2 whose p99 is compared with the before-phase p99
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_SYSTEM_ROW = b'System </td><td class="v">'  # phpinfo(): "Linux <hostname> <release> ..."


# -- the server under test ---------------------------------------------------------------------


def find_image_store(explicit: str | None) -> str:
    """A data root whose image store has apache-php: --image-store, the root tests' cache,
    or fcrun's own data root. The image is built there when it is missing or its recipe
    (rootfs/apache-php: the Apache settings are part of the experiment) has changed."""
    from fcrun.errors import NotFound
    from fcrun.images import ImageStore
    from fcrun.paths import Paths

    candidates = [explicit] if explicit else [os.environ.get("FCRUN_TEST_IMAGE_CACHE", "/var/cache/fcrun-test"),
                                              Paths.from_env().data_root]
    root = candidates[-1]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            ImageStore(Paths(data_root=candidate, run_root="/nonexistent")).get("apache-php")
            root = candidate
            break
        except (NotFound, OSError):
            continue
    progress = lambda line: print(line, file=sys.stderr)  # noqa: E731 - "up to date", or the build's steps
    ImageStore(Paths(data_root=root, run_root="/nonexistent")).build("apache-php", progress=progress)
    return root


# -- the client --------------------------------------------------------------------------------


@dataclass
class Record:
    sent: float  # perf_counter seconds since the run began
    latency: float = 0.0  # seconds
    status: int = 0  # 0: no response (reset, timeout)
    server: str = ""  # hostname from phpinfo: which instance served it
    error: str = ""


class _Connection(asyncio.Protocol):
    """One keep-alive client connection, driven by callbacks: a coroutine per request would
    cost client CPU that the containers need on a small machine."""

    def __init__(self, load: "Load", first: int | None):
        import httptools

        self.load = load
        self.first = first  # an index to send as soon as connected (a retry after a reconnect)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.index: int | None = None
        self.record: Record | None = None
        self.head = bytearray()  # the first bytes of the body: phpinfo's System row is there
        self.timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.first is not None:
            self.send(self.first)
        else:
            self.load.next_request(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001 - a malformed response is a failure like any other
            self.fail(f"{type(exc).__name__}: {exc}")

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.record is not None:
            self.fail("ConnectionResetError: connection closed before the response ended")

    # httptools callbacks
    def on_body(self, data: bytes) -> None:
        if len(self.head) < 16384:
            self.head += data[:16384]

    def on_message_complete(self) -> None:
        record, self.record = self.record, None
        if record is None:
            return
        record.latency = time.perf_counter() - self.load.t0 - record.sent
        record.status = self.parser.get_status_code()
        record.server = _served_by(bytes(self.head))
        self.timer.cancel()
        keep_alive = self.parser.should_keep_alive()
        self.load.finished()
        if keep_alive:
            self.load.next_request(self)
        else:
            self.transport.close()
            self.load.connect(None)

    # driving
    def send(self, index: int) -> None:
        """Send request `index` now (on a new connection if this one has gone meanwhile)."""
        if self.transport is None or self.transport.is_closing():
            self.load.connect(index)
            return
        import httptools

        self.index = index
        self.record = self.load.records[index] = Record(sent=time.perf_counter() - self.load.t0)
        self.head = bytearray()
        self.parser = httptools.HttpResponseParser(self)
        self.timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, self.fail, "TimeoutError")
        self.transport.write(self.load.request)

    def fail(self, error: str) -> None:
        record, self.record = self.record, None
        if record is None:
            return
        record.latency = time.perf_counter() - self.load.t0 - record.sent
        record.error = error
        self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows; the record is already settled
        self.load.finished()
        self.load.connect(None)  # go on with the next request on a fresh connection


def _served_by(body: bytes) -> str:
    at = body.find(_SYSTEM_ROW)
    if at < 0:
        return ""
    parts = body[at + len(_SYSTEM_ROW):at + len(_SYSTEM_ROW) + 200].split()
    return parts[1].decode(errors="replace") if len(parts) > 1 else ""


class Load:
    """N GET / requests over `concurrency` keep-alive connections, each response time recorded
    by request index. `on_trigger` (a coroutine function) starts as request `trigger` is sent;
    before that, with `pace_rps`, requests start no faster than that rate. A failed request is
    recorded as failed (never retried) and its connection replaced."""

    def __init__(self, port: int, n: int, concurrency: int, trigger: int | None = None, on_trigger=None,
                 pace_rps: float | None = None):
        self.port, self.n, self.concurrency = port, n, concurrency
        self.trigger, self.on_trigger, self.pace_rps = trigger, on_trigger, pace_rps
        self.request = f"GET / HTTP/1.1\r\nHost: {APP}\r\nUser-Agent: fcrun-bench-paper\r\n\r\n".encode()
        self.records: list[Record | None] = [None] * n
        self.t0 = self.wall0 = 0.0
        self.trigger_at: float | None = None
        self._next = self._finished = 0
        self._idle: collections.deque[_Connection] = collections.deque()  # paced, waiting to send
        self._pacer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._done: asyncio.Future | None = None

    async def run(self) -> None:
        self._done = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        for _ in range(self.concurrency):
            self.connect(None)
        await self._done
        if self._tasks:
            await asyncio.gather(*self._tasks)

    def connect(self, index: int | None) -> None:
        """A new connection that sends `index` first, or else the next request."""
        if index is None and self._next >= self.n:
            return
        self._spawn(self._connect(index))

    async def _connect(self, index: int | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _Connection(self, index), "127.0.0.1", self.port)
        except OSError as exc:
            index = index if index is not None else self._take()
            if index is not None:
                self.records[index] = Record(sent=time.perf_counter() - self.t0, error=f"connect: {exc}")
                self.finished()
            await asyncio.sleep(0.01)
            self.connect(None)

    def next_request(self, conn: _Connection) -> None:
        if self.pace_rps and self.trigger is not None and self._next < self.trigger:
            # Paced: the connection waits, idle, until the next request is due.
            self._idle.append(conn)
            self._pace()
            return
        index = self._take()
        if index is None:
            conn.transport.close()
            return
        conn.send(index)

    def _pace(self) -> None:
        """Send each due request on an idle connection; at the trigger, release them all."""
        self._pacer = None
        now = time.perf_counter()
        while self._idle and self._next < self.trigger and self.t0 + self._next / self.pace_rps <= now:
            self._idle.popleft().send(self._take())
        if self._next >= self.trigger:
            idle, self._idle = self._idle, collections.deque()
            for conn in idle:
                self.next_request(conn)
        elif self._idle and self._pacer is None:
            due = self.t0 + self._next / self.pace_rps
            self._pacer = asyncio.get_running_loop().call_later(max(0.0, due - now), self._pace)

    def _take(self) -> int | None:
        if self._next >= self.n:
            return None
        index = self._next
        self._next += 1
        if index == self.trigger:
            self.trigger_at = time.perf_counter() - self.t0
            if self.on_trigger is not None:
                self._spawn(self.on_trigger())
        return index

    def finished(self) -> None:
        self._finished += 1
        if self._finished == self.n and not self._done.done():
            self._done.set_result(None)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# -- one experiment ----------------------------------------------------------------------------


def warm_up(server: ServeProcess, concurrency: int, warmup_s: float) -> float:
    """Start the instance and load it for `warmup_s` (at least two rounds); returns its
    throughput (requests/s), the lower of the last two rounds (the machine is shared with the
    client and the proxy, so it varies)."""
    chunk = max(500, 4 * concurrency)
    deadline = time.monotonic() + warmup_s
    rates: list[float] = []
    while True:
        warm = Load(server.port, chunk, concurrency)
        asyncio.run(warm.run())
        failed = [r for r in warm.records if r.error or r.status != 200]
        if failed:
            raise RuntimeError(f"warm-up failed: {failed[0]}\n{server.log_tail()}")
        rates.append(chunk / max(r.sent + r.latency for r in warm.records))
        if time.monotonic() >= deadline and len(rates) >= 2:
            return min(rates[-2:])


def run_mode(image_root: str, mode: str, n: int, concurrency: int, warmup_s: float,
             base_share: float) -> dict:
    from fcrun.cmdb.models import AppUpdate, NewApp, Scale
    from fcrun.units import parse_memory

    tag = str(os.getpid())
    work = tempfile.mkdtemp(prefix="fcrun-paper-")
    server = ServeProcess(work, image_root, cgroup_parent=f"fcrun-paper-{tag}", bridge=f"fcp{tag}"[:15], subnet=SUBNET,
                          hold_timeout_s=20, drain_timeout_s=10)
    try:
        server.start()
        admin = server.admin()
        admin.add_app(NewApp(name=APP, image="apache-php", cpu=CPU, cpu_max=CPU_MAX,
                             memory_bytes=parse_memory(MEMORY), max_instances=2, autoscale=False,
                             idle_timeout_s=600.0, env=PAPER_ENV))
        capacity_rps = warm_up(server, concurrency, warmup_s)
        so_far = admin.events(APP, limit=10000)
        first_event = so_far[-1].id if so_far else 0

        action: dict = {}

        async def act() -> None:
            loop = asyncio.get_running_loop()
            action["sent_s"] = time.perf_counter() - load.t0
            request = Scale(instances=2) if mode == "scale-out" else Scale(cpu=CPU_MAX)
            result = await loop.run_in_executor(None, admin.scale, APP, request)
            action["applied_s"] = time.perf_counter() - load.t0
            action["result"] = {k: v for k, v in (("instances", result.instances), ("cpu", result.cpu)) if v}

        pace = None
        if mode == "reactive":
            admin.update_app(APP, AppUpdate(autoscale=True))
            pace = base_share * capacity_rps
        load = Load(server.port, n, concurrency, trigger=n // 2, on_trigger=None if mode == "reactive" else act,
                    pace_rps=pace)
        asyncio.run(load.run())
        events = [e for e in admin.events(APP, since_id=first_event, limit=10000)
                  if e.kind.startswith(("scale", "start"))]
        return summarize(mode, load, action, events, capacity_rps, pace, concurrency)
    finally:
        server.stop()
        server.reap_leftovers()
        shutil.rmtree(work, ignore_errors=True)


def phase(records: list[Record]) -> dict:
    ok = [r for r in records if not r.error and 200 <= r.status < 300]
    lat = [r.latency * 1000 for r in ok]
    span = max(r.sent + r.latency for r in records) - min(r.sent for r in records)
    return {"requests": len(records), "p50_ms": round(percentile(lat, 50), 2), "p90_ms": round(percentile(lat, 90), 2),
            "p99_ms": round(percentile(lat, 99), 2), "mean_ms": round(sum(lat) / len(lat), 2) if lat else None,
            "throughput_rps": round(len(records) / span, 1)}


def summarize(mode: str, load: Load, action: dict, events: list, capacity_rps: float, pace: float | None,
              concurrency: int) -> dict:
    records = load.records
    n = len(records)
    half = n // 2
    before, after = records[:half], records[half:]
    window = records[max(0, half - SWITCH_WINDOW // 2):half + SWITCH_WINDOW // 2]
    failures = {
        "non_2xx": sum(1 for r in records if not r.error and not 200 <= r.status < 300),
        "resets": sum(1 for r in records if r.error and "Timeout" not in r.error),
        "timeouts": sum(1 for r in records if "Timeout" in r.error),
    }
    first_errors = sorted({r.error for r in records if r.error})[:3]
    out = {
        "mode": mode,
        "requests": n,
        "concurrency": concurrency,
        "before": phase(before),
        "after": phase(after),
        "switch_window": {"requests": len(window), **{k: v for k, v in phase(window).items() if k.startswith("p")}},
        "failures": failures,
    }
    if first_errors:
        out["failure_examples"] = first_errors
    out["after_p50_over_before"] = round(out["after"]["p50_ms"] / out["before"]["p50_ms"], 3)
    out["switch_p99_over_before_p99"] = round(out["switch_window"]["p99_ms"] / out["before"]["p99_ms"], 3)
    # Which instances served the first half: anything else afterwards is new capacity.
    old_servers = {r.server for r in before if r.server}
    t_trigger = load.trigger_at if load.trigger_at is not None else records[half].sent
    wall = lambda ts: ts - load.wall0  # an event's wall-clock time on the run's clock  # noqa: E731
    scale_events = [{"t_s": round(wall(e.ts) - t_trigger, 3), "kind": e.kind, "message": e.message}
                     for e in events]
    out["events_from_switch"] = scale_events
    new_server = [r for r in after if r.server and r.server not in old_servers]
    if mode in ("scale-out", "scale-up"):
        sent, applied = action["sent_s"], action["applied_s"]
        if mode == "scale-out":  # served by the new instance
            first = min((r.sent + r.latency for r in new_server), default=None)
        else:  # sent after the new quota was written (the API answers after the write)
            first = min((r.sent + r.latency for r in after if r.sent >= applied), default=None)
        out["action"] = {"at_request": half, "api_returned_ms": _ms(applied, sent),
                         "first_served_by_new_capacity_ms": _ms(first, sent)}
    else:
        # The policy's first decision after the overload: a scale-out's event is written when it
        # is decided (the start follows), a scale-up's once the new quota is written.
        acted = [e for e in events if e.kind in ("scale-up", "scale-out") and wall(e.ts) >= t_trigger]
        first_acted = first = None
        if acted:
            first_acted = wall(acted[0].ts)
            if acted[0].kind == "scale-up":
                first = min((r.sent + r.latency for r in after if r.sent >= first_acted), default=None)
            else:
                first = min((r.sent + r.latency for r in new_server), default=None)
        out["action"] = {"overload_at_request": half, "base_rate_rps": round(pace or 0, 1),
                         "policy_acted_after_ms": _ms(first_acted, t_trigger),
                         "first_served_by_new_capacity_ms": _ms(first, t_trigger),
                         "decisions": [e["kind"] for e in scale_events if e["kind"].startswith("scale")]}
    out["one_instance_capacity_rps"] = round(capacity_rps, 1)
    out["servers"] = sorted({r.server for r in records if r.server})
    out["latencies_ms"] = [round(r.latency * 1000, 3) for r in records]  # for the plot; dropped from the JSON
    return out


def _ms(t: float | None, since: float | None) -> float | None:
    return None if t is None or since is None else round((t - since) * 1000, 1)


def check_targets(results: list[dict]) -> dict[str, bool]:
    """The issue's targets, where this run can tell."""
    by_mode = {r["mode"]: r for r in results}
    checks = {f"{m}: no failures": sum(r["failures"].values()) == 0 for m, r in by_mode.items()}
    for mode in ("scale-out", "scale-up"):
        if mode in by_mode:
            r = by_mode[mode]
            checks[f"{mode}: after p50 <= 0.55 x before"] = r["after_p50_over_before"] <= 0.55
            checks[f"{mode}: switch p99 <= 1.5 x before p99"] = r["switch_p99_over_before_p99"] <= 1.5
    if "reactive" in by_mode:
        r = by_mode["reactive"]
        acted = r["action"]["policy_acted_after_ms"]
        checks["reactive: acted within 1 s of overload"] = acted is not None and acted <= 1000
        for mode in ("scale-out", "scale-up"):
            if mode in by_mode:
                checks[f"reactive: after p50 <= 1.1 x {mode}'s"] = (
                    r["after"]["p50_ms"] <= 1.1 * by_mode[mode]["after"]["p50_ms"])
                # Its first half is light, so its own before-phase p99 says nothing about a stall;
                # the same overload on one instance at 0.3 CPU is the forced modes' first half.
                checks[f"reactive: switch p99 <= 1.5 x {mode}'s before p99"] = (
                    r["switch_window"]["p99_ms"] <= 1.5 * by_mode[mode]["before"]["p99_ms"])
    return checks


# -- the plot ----------------------------------------------------------------------------------


def plot(results: list[dict], path: str) -> str | None:
    """Response time against request index, one panel per mode (like the talk's figures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fcrun[bench]'): no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        lat = result["latencies_ms"]
        n = len(lat)
        ax.scatter(range(n), lat, s=0.5, alpha=0.4, linewidths=0, color="tab:blue", rasterized=True)
        ax.axvline(n // 2, color="tab:red", linewidth=0.8, linestyle="--")
        top = percentile(lat, 99.9) * 1.15
        ax.set_ylim(0, top)
        ax.set_xlim(0, n)
        b, a = result["before"], result["after"]
        title = (f"{result['mode']}: p50 {b['p50_ms']:.0f} -> {a['p50_ms']:.0f} ms, "
                 f"{b['throughput_rps']:.0f} -> {a['throughput_rps']:.0f} req/s, "
                 f"failures {sum(result['failures'].values())}")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("response time (ms)")
        label = "overload" if result["mode"] == "reactive" else "action"
        ax.text(n // 2, top * 0.95, f" {label} at request {n // 2}", color="tab:red", fontsize=8, va="top")
    axes[-1, 0].set_xlabel("request index")
    fig.suptitle(f"fcrun bench paper: apache-php phpinfo() at {CPU} CPU, {MEMORY}, "
                 f"{results[0]['concurrency']} concurrent requests", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=96)
    parser.add_argument("--warmup-s", type=float, default=4.0,
                        help="load before the run, not recorded (default: 4 s)")
    parser.add_argument("--base-share", type=float, default=0.5,
                        help="reactive mode: first-half pace as a share of one instance's warm-up throughput")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON and the PNG")
    parser.add_argument("--image-store", default=None, help="data root holding the apache-php image")
    args = parser.parse_args(argv)
    if code := preflight("bench/paper.py"):
        return code
    if args.requests < 2 * SWITCH_WINDOW or args.concurrency < 1:
        parser.error(f"--requests must be at least {2 * SWITCH_WINDOW} and --concurrency at least 1")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    image_root = find_image_store(args.image_store)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    started = time.monotonic()
    for mode in modes:
        t = time.monotonic()
        result = run_mode(image_root, mode, args.requests, args.concurrency, args.warmup_s, args.base_share)
        result["wall_s"] = round(time.monotonic() - t, 1)
        results.append(result)
        print(f"{mode}: done in {result['wall_s']} s", file=sys.stderr)
    checks = check_targets(results)
    stem = os.path.join(args.out, f"paper-{args.mode}-{args.requests}")
    png = plot(results, stem + ".png")
    for result in results:
        del result["latencies_ms"]
    doc = {"requests": args.requests, "concurrency": args.concurrency, "cpu": CPU, "cpu_max": CPU_MAX,
           "memory": MEMORY, "host_cpus": os.cpu_count(), "wall_s": round(time.monotonic() - started, 1),
           "checks": checks, "results": results, "plot": png}
    text = json.dumps(doc, indent=2)
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        f.write(text + "\n")
    print(text)
    if png:
        print(f"plot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
