#!/usr/bin/env python3
"""Slow and idle clients against a real `fcrun serve`: a well-behaved client's latency and serve's RSS.

One `fcrun serve` on private roots (ServeProcess) with two apache-php apps: `good.slow.test`
(a tiny index.php) for the well-behaved client, and `hostile.slow.test` for the hostile
clients' requests that reach an app (a slow body holds an Apache worker while it trickles, since
fcrun streams request bodies; sending them to the good app would measure Apache's 8 workers,
not the proxy). Phases, in one run, --rounds times over (so that noise hits both alike), then one more unloaded:

  unloaded: --requests sequential GET / of the good app on one keep-alive connection
  loaded:   the same, while held open at once: --idle connections that send nothing,
            --slow-heads connections that sent half a request head, --slow-bodies POSTs that
            sent one byte of a 1 MiB body, --slow-readers GETs of a 64 MiB file that read
            nothing (all closed at the end of the phase)

Reports per phase median/p99 (ms) over all its requests, the median over rounds of each
round's p99, and the ratio of the loaded p99 to the unloaded one (goal < 2, issue 12); every
response is checked (200, body "hi"). serve's VmRSS before the first loading, while holding
everything (each round: the later rounds reuse what the first one grew, so a leak would show
as growth round by round), after, and the growth per held connection in the first round. serve's [proxy] config raises
header_timeout_s, max_connections and max_connections_per_ip so that the held connections stay
(all come from 127.0.0.1); the other bounds keep their defaults.

Needs root and the apache-php image. Private bridge 10.236.0.0/24 and cgroup parent; talks to
127.0.0.1 only. RLIMIT_NOFILE's soft limit is raised to the hard one (serve inherits it).
Writes bench/results/slow-clients-<idle>.json.
Usage: bench/slow_clients.py [--idle 5000] [--requests 1000] [--slow-heads 200] [--slow-bodies 4]
                             [--slow-readers 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import time

from fcrun.cmdb import App, open_cmdb
from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary, work_dir_with_site  # noqa: E402

SUBNET = "10.236.0.0/24"
GOOD, HOSTILE = "good.slow.test", "hostile.slow.test"
BIG_FILE_BYTES = 64 * 1024 * 1024
GOAL_P99_RATIO = 2.0


def vmrss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def get(sock: socket.socket, host: str) -> tuple[int, bytes]:
    """GET / on a keep-alive connection; (status, body)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
    else:   # chunked (PHP's output)
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)
        decoded, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return int(head.split(b" ")[1]), body


def timed_requests(port: int, n: int) -> list[float]:
    """n sequential GETs of the good app on one connection; their latencies in ms (all checked)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for _ in range(20):   # warm this connection
            get(sock, GOOD)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            status, body = get(sock, GOOD)
            out.append((time.perf_counter() - t0) * 1000)
            if status != 200 or body != b"hi":
                raise RuntimeError(f"well-behaved request answered {status} {body[:200]!r}")
        return out
    finally:
        sock.close()


def hold(port: int, n: int, first_bytes: bytes = b"", rcvbuf: int = 0) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
        if first_bytes:
            sock.sendall(first_bytes)
        socks.append(sock)
    return socks


def still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` serve has not closed (nothing to read, no EOF, no reset)."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(1, socket.MSG_PEEK) != b""   # a slow reader has bytes waiting: open
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-heads", type=int, default=200)
    parser.add_argument("--slow-bodies", type=int, default=4)
    parser.add_argument("--slow-readers", type=int, default=4)
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args()
    if code := preflight("bench/slow_clients.py"):
        return code
    held_total = args.idle + args.slow_heads + args.slow_bodies + args.slow_readers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < held_total + 1024:
        print(f"bench/slow_clients.py: RLIMIT_NOFILE hard limit {hard} is under {held_total + 1024}", file=sys.stderr)
        return 77
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-slow-", "<?php echo 'hi';")
    hostile_site = os.path.join(work, "hostile")
    os.mkdir(hostile_site)
    with open(os.path.join(hostile_site, "index.php"), "w") as f:
        f.write("<?php echo strlen(file_get_contents('php://input'));")
    with open(os.path.join(hostile_site, "big.bin"), "wb") as f:
        f.truncate(BIG_FILE_BYTES)
    os.chmod(hostile_site, 0o755)
    limit = held_total + 1000
    serve = ServeProcess(work, args.image_root, cgroup_parent=f"fcrun-slow-{tag}", bridge=f"fcs{tag}"[:15],
                         subnet=SUBNET, hold_timeout_s=60,
                         extra_config=f"[proxy]\nheader_timeout_s = 600\nmax_connections = {limit}\n"
                                      f"max_connections_per_ip = {limit}\n")
    out: dict = {
        "benchmark": "slow_clients",
        "what": "real fcrun serve; well-behaved GET / (index.php 'hi') on one keep-alive connection",
        "held": {"idle": args.idle, "slow_heads": args.slow_heads, "slow_bodies": args.slow_bodies,
                 "slow_readers": args.slow_readers, "total": held_total},
        "requests_per_phase": args.requests,
        "cpus": os.cpu_count(),
    }
    t_begin = time.monotonic()
    held: list[socket.socket] = []
    try:
        cmdb = open_cmdb(serve.paths)
        try:
            for name, docroot in ((GOOD, site), (HOSTILE, hostile_site)):
                cmdb.add_app(App(name=name, image="apache-php", docroot=docroot, cpu=1.0,
                                 memory_bytes=256 * 1024 * 1024, idle_timeout_s=3600, freeze_after_s=None))
        finally:
            cmdb.close()
        serve.start()
        for host in (GOOD, HOSTILE):
            status, _, body = serve.request(host)
            if status != 200:
                raise RuntimeError(f"{host}: {status} {body[:300]!r}")
        port, pid = serve.port, serve.proc.pid
        unloaded: list[list[float]] = []
        loaded: list[list[float]] = []
        rss_before = 0
        rss_held: list[int] = []
        alive = []
        timed_requests(port, args.requests)   # warm-up (PHP's opcache, Apache's workers), not counted
        for round_index in range(args.rounds):
            unloaded.append(timed_requests(port, args.requests))
            if round_index == 0:
                rss_before = vmrss(pid)
            t0 = time.monotonic()
            held += hold(port, args.idle)
            held += hold(port, args.slow_heads, b"GET / HTTP/1.1\r\nHost: " + HOSTILE.encode())
            held += hold(port, args.slow_bodies, b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: 1048576\r\n\r\nx"
                         % HOSTILE.encode())
            held += hold(port, args.slow_readers, b"GET /big.bin HTTP/1.1\r\nHost: %s\r\n\r\n" % HOSTILE.encode(),
                         rcvbuf=4096)
            out.setdefault("hold_s", []).append(round(time.monotonic() - t0, 2))
            time.sleep(1.0)   # let serve accept and settle
            loaded.append(timed_requests(port, args.requests))
            rss_held.append(vmrss(pid))
            alive.append(still_open(held))
            for sock in held:
                sock.close()
            held.clear()
            time.sleep(1.0)
        unloaded.append(timed_requests(port, args.requests))
        rss_after = vmrss(pid)

        out["held_still_open_at_end_of_each_loaded_phase"] = alive
        out["unloaded"] = summary([ms for run in unloaded for ms in run], 3)
        out["loaded"] = summary([ms for run in loaded for ms in run], 3)
        out["unloaded"]["p99_ms_per_round"] = [summary(run, 3)["p99_ms"] for run in unloaded]
        out["loaded"]["p99_ms_per_round"] = [summary(run, 3)["p99_ms"] for run in loaded]
        out["p99_loaded_over_unloaded"] = round(out["loaded"]["p99_ms"] / out["unloaded"]["p99_ms"], 2)
        out["median_round_p99_loaded_over_unloaded"] = round(
            statistics.median(out["loaded"]["p99_ms_per_round"]) / statistics.median(out["unloaded"]["p99_ms_per_round"]), 2)
        out["median_loaded_over_unloaded"] = round(out["loaded"]["median_ms"] / out["unloaded"]["median_ms"], 2)
        out["goal_p99_ratio_max"] = GOAL_P99_RATIO
        out["goal_met"] = max(out["p99_loaded_over_unloaded"],
                              out["median_round_p99_loaded_over_unloaded"]) < GOAL_P99_RATIO
        out["serve_rss"] = {
            "before_mib": round(rss_before / 2**20, 1),
            "holding_mib_per_round": [round(rss / 2**20, 1) for rss in rss_held],
            "after_close_mib": round(rss_after / 2**20, 1),
            "connections_held_at_once": held_total,
            "growth_per_held_connection_kib": round((rss_held[0] - rss_before) / held_total / 1024, 2),
        }
        serve.stop()
    finally:
        for sock in held:
            sock.close()
        serve.stop()
        serve.reap_leftovers()
        out["serve_exit_codes"] = serve.exit_codes
        shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t_begin, 1)
    text = json.dumps(out, indent=None if args.json else 2)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, f"slow-clients-{args.idle}.json"), "w") as f:
        f.write(json.dumps(out, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
