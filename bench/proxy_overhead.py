#!/usr/bin/env python3
"""Proxy overhead: fcrun's ProxyServer against nginx proxy_pass, measured in one run.

wrk (keep-alive, same threads and connections for all) fetches a 1 KiB static file from one
nginx backend on 127.0.0.1, three ways, interleaved round by round so that background noise
hits all of them alike:

  (a) direct:   wrk -> nginx backend
  (b) fcrun:    wrk -> ProxyServer (uvloop, static Router with acquire_nowait) -> nginx backend
  (c) nginx:    wrk -> nginx proxy_pass (upstream keepalive, X-Forwarded-* set) -> nginx backend

Every server runs one worker (one process, one event loop), like the fcrun proxy. Prints JSON:
per contender the median over rounds of requests/s, p50 and p99 (ms, from wrk --latency), the
proxy's own CPU time per request (user + system, from /proc), and the ratios (b)/(c) of
throughput and CPU per request and (b)-(a) of p50. Targets (issue 4): b/c >= 0.9 and added p50
<= 0.3 ms. By default everything (wrk, backend, proxy) shares this machine's cores, so a proxy
that needs more CPU also takes it from wrk and the backend; --pin gives the proxy under test a
core of its own (CPU 0) and the rest to wrk and the backend.

Needs wrk and nginx (Debian packages). Starts its own nginx instances with a private config and
temp dir on high ports, never the system's; stops only the processes it started.
Usage: bench/proxy_overhead.py [--rounds 3] [--duration 5] [--connections 64] [--threads 2] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
APP_HOST = "bench.test"

# Both nginx instances: one worker, keep-alive without end, no access log. {http} is the rest
# of the http block: BACKEND_HTTP or PROXY_HTTP.
NGINX_CONF = """
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{http}}}
"""

BACKEND_HTTP = """\
    server {{
        listen {host}:{port} backlog=4096;
        root {tmp}/www;
        location / {{ }}
    }}
"""

PROXY_HTTP = """\
    upstream backend {{
        server {host}:{backend_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_buffering on;
        }}
    }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout_s} s")


def start_nginx(tmp: str, name: str, http: str, pin: list[str]) -> subprocess.Popen:
    """nginx with NGINX_CONF around `http` (the rest of its http block), in the foreground."""
    path = os.path.join(tmp, f"{name}.conf")
    with open(path, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, name=name, http=http))
    return subprocess.Popen(pin + ["nginx", "-p", tmp, "-c", path, "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)   # nginx: fast shutdown of the master and its worker
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    latency = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", output, re.M):
        latency[pct] = float(value) * _UNIT_MS[unit]
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {"rps": rps, "requests": requests, "p50_ms": latency.get("50"), "p99_ms": latency.get("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1).strip() if socket_errors else None}


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU time of the processes (and of their children, e.g. nginx's worker)."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        for p in [pid] + children(pid):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def run_wrk(port: int, args: argparse.Namespace, duration_s: float, measure: list[int] = ()) -> dict:
    before = cpu_seconds(measure) if measure else (0.0, 0.0)
    cmd = (["taskset", "-c", args.client_cpus] if args.pin else []) + [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{max(1, round(duration_s))}s", "--latency",
        "-H", f"Host: {APP_HOST}", f"http://{HOST}:{port}/index.html"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = parse_wrk(out)
    if measure:
        # user and system apart: the system part (the same syscalls for any proxy) is a floor
        # that no user-space speed-up goes under
        user, system = (now - then for now, then in zip(cpu_seconds(measure), before))
        result["proxy_cpu_us_per_request"] = (user + system) / result["requests"] * 1e6
        result["proxy_user_us_per_request"] = user / result["requests"] * 1e6
        result["proxy_system_us_per_request"] = system / result["requests"] * 1e6
    if result["non_2xx"]:
        raise RuntimeError(f"{' '.join(cmd)}: {result['non_2xx']} responses were not 2xx/3xx")
    return result


def serve_fcrun(port: int, backend_port: int, nowait: bool = True) -> None:
    """Child process: the fcrun proxy on uvloop with a static Router (what (b) measures)."""
    from fcrun.proxy import ProxyConfig, ProxyServer, event_loop_factory

    class StaticLease:
        addr = (HOST, backend_port)
        cold_start = None
        max_body_bytes = None
        instance_id = "bench-1"

        def done(self, status: int, request_bytes: int, response_bytes: int, failed: bool) -> None:
            pass

    lease = StaticLease()

    class StaticRouter:
        async def acquire(self, host: str) -> StaticLease:
            return lease

    class StaticRouterNowait(StaticRouter):
        def acquire_nowait(self, host: str) -> StaticLease:
            return lease

    async def main() -> None:
        server = ProxyServer(StaticRouterNowait() if nowait else StaticRouter(), ProxyConfig())
        await server.start(HOST, port)
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        await stopping.wait()
        await server.close(drain_timeout_s=1.0)

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())


def summarize(runs: list[dict]) -> dict:
    extra = {}
    for key in ("proxy_cpu_us_per_request", "proxy_user_us_per_request", "proxy_system_us_per_request"):
        if key in runs[0]:
            extra[key] = round(statistics.median(r[key] for r in runs), 2)
    return {**extra, "rps": round(statistics.median(r["rps"] for r in runs)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": [r["socket_errors"] for r in runs if r["socket_errors"]],
            "runs_rps": [round(r["rps"]) for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each round's runs")
    parser.add_argument("--pin", action="store_true",
                        help="pin the proxy under test to CPU 0, wrk and the backend to the others")
    parser.add_argument("--no-nowait", action="store_true",
                        help="(b) with a Router without acquire_nowait: an asyncio task per request")
    parser.add_argument("--serve-fcrun", nargs=2, type=int, metavar=("PORT", "BACKEND_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fcrun:
        serve_fcrun(*args.serve_fcrun, nowait=not args.no_nowait)
        return 0
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench/proxy_overhead.py: needs {tool} (apt-get install -y {tool})", file=sys.stderr)
            return 77

    cpus = os.cpu_count() or 1
    if args.pin and cpus < 2:
        print("bench/proxy_overhead.py: --pin needs 2 CPUs", file=sys.stderr)
        return 2
    args.client_cpus = f"1-{cpus - 1}" if cpus > 2 else "1"
    proxy_pin = ["taskset", "-c", "0"] if args.pin else []
    client_pin = ["taskset", "-c", args.client_cpus] if args.pin else []

    tmp = tempfile.mkdtemp(prefix="fcrun-proxy-bench-")
    os.chmod(tmp, 0o755)   # nginx workers run as an unprivileged user when started by root
    os.makedirs(os.path.join(tmp, "www"))
    os.makedirs(os.path.join(tmp, "logs"))   # nginx -p wants it even with logs elsewhere
    with open(os.path.join(tmp, "www", "index.html"), "wb") as f:
        f.write(b"x" * 1023 + b"\n")
    ports = {"direct": free_port(), "fcrun": free_port(), "nginx": free_port()}
    procs: list[subprocess.Popen] = []
    try:
        backend = start_nginx(tmp, "backend", BACKEND_HTTP.format(tmp=tmp, host=HOST, port=ports["direct"]),
                              client_pin)
        procs.append(backend)
        wait_listening(ports["direct"], backend)
        proxy = start_nginx(tmp, "proxy", PROXY_HTTP.format(host=HOST, port=ports["nginx"],
                                                            backend_port=ports["direct"]), proxy_pin)
        procs.append(proxy)
        wait_listening(ports["nginx"], proxy)
        fcrun = subprocess.Popen(proxy_pin + [sys.executable, os.path.abspath(__file__), "--serve-fcrun",
                                              str(ports["fcrun"]), str(ports["direct"])]
                                 + (["--no-nowait"] if args.no_nowait else []))
        procs.append(fcrun)
        wait_listening(ports["fcrun"], fcrun)

        measured = {"direct": [], "fcrun": [fcrun.pid], "nginx": [proxy.pid]}
        results: dict[str, list[dict]] = {name: [] for name in ports}
        for _ in range(args.rounds):
            for name, port in ports.items():
                if args.warmup:
                    run_wrk(port, args, args.warmup)
                results[name].append(run_wrk(port, args, args.duration, measured[name]))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {name: summarize(runs) for name, runs in results.items()}
    report = {
        "benchmark": "proxy_overhead",
        "response_bytes": 1024,
        "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration,
                "rounds": args.rounds},
        "cpus": cpus,
        "pinned": "proxy on CPU 0, wrk and backend on the rest" if args.pin else False,
        "router": "acquire (a task per request)" if args.no_nowait else "acquire_nowait",
        "python": sys.version.split()[0],
        "a_direct": summary["direct"],
        "b_fcrun": summary["fcrun"],
        "c_nginx_proxy": summary["nginx"],
        "throughput_b_over_c": round(summary["fcrun"]["rps"] / summary["nginx"]["rps"], 3),
        "added_p50_ms_b_minus_a": round(summary["fcrun"]["p50_ms"] - summary["direct"]["p50_ms"], 3),
        "added_p50_ms_c_minus_a": round(summary["nginx"]["p50_ms"] - summary["direct"]["p50_ms"], 3),
        "proxy_cpu_b_over_c": round(summary["fcrun"]["proxy_cpu_us_per_request"]
                                    / summary["nginx"]["proxy_cpu_us_per_request"], 3),
        "targets": {"throughput_b_over_c": 0.9, "added_p50_ms_b_minus_a": 0.3},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
