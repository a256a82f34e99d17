#!/usr/bin/env python3
"""A burst of concurrent requests to a freshly started Apache/PHP instance, through `fcrun serve`
and straight to the instance (issue 17: fewer prefork workers per instance).

Apache prefork gives each connection a worker for as long as the connection stays open, and a
new instance has only the workers it forked at start (APACHE_START_SERVERS). A burst wider than
that waits: each extra connection sits in the kernel's accept queue until some worker's
connection closes. A client that closes after its response (the direct contender here) frees
its worker at once; a proxy that keeps its upstream connections alive does not, unless it
closes them while one of its connections waits (proxy/upstream.py).

Each round, on a fresh instance of the app (scaled to zero, then cold-started from the pool by
one GET; with --workers, from nothing, as the pool runs the image's own env): --clients concurrent GETs of a page that takes ~2 ms of PHP, each on a new connection,
  (a) direct: to the instance's address and port 80, no proxy (the baseline);
  (b) serve:  through serve's proxy (keep-alive to the instance).
The order of (a) and (b) alternates by round. The app is held at one instance (--max 1), so
serve cannot hide the burst by scaling out.

Prints JSON: per contender the median, p99 and max latency of a request (ms), how many took over
a second, and serve's p99 over direct's. Needs root and the apache-php image. Usage:
bench/burst.py [--rounds 6] [--clients 32] [--workers N] [--image-root DIR] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import sys
import time

from fcrun.cmdb.models import Scale
from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import percentile, preflight, summary, work_dir_with_site  # noqa: E402

SUBNET = "10.238.0.0/24"
PAGE = "<?php usleep(2000); echo $_SERVER['SERVER_ADDR'];\n"


def get(ip: str, port: int, host: str, timeout_s: float) -> tuple[int, bytes, float]:
    """One GET / on a new connection: (status, body, ms)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, body, (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=32, help="concurrent requests in a burst")
    parser.add_argument("--workers", type=int, default=None,
                        help="APACHE_START_SERVERS and APACHE_MIN_SPARE_SERVERS of the app (default: the image's)")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if code := preflight("bench/burst.py"):
        return code
    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-burst-", PAGE)
    serve = ServeProcess(work, args.image_root, cgroup_parent=f"fcrun-burst-{tag}", bridge=f"fcu{tag}"[:15],
                         subnet=SUBNET, extra_config="[forkserver]\npool_size = 1\n")
    env = [] if args.workers is None else ["--env", f"APACHE_START_SERVERS={args.workers}",
                                          "--env", f"APACHE_MIN_SPARE_SERVERS={args.workers}"]
    times: dict[str, list[float]] = {"direct": [], "serve": []}
    try:
        serve.cli("app", "add", "burst.test", "--image", "apache-php", "--docroot", site, "--max", "1",
                  "--freeze-after", "off", "--idle-timeout", "600s", *env)
        serve.start()
        admin = serve.admin()

        def fresh_instance() -> str:
            """Scale the app to zero, start it again with one GET; its address."""
            admin.scale("burst.test", Scale(instances=0))
            deadline = time.monotonic() + args.timeout
            while admin.stats("burst.test")["burst.test"].instances.total:
                if time.monotonic() > deadline:
                    raise SystemExit("burst.test did not scale to zero")
                time.sleep(0.05)
            if args.workers is None:  # an app with env of its own is not started from the pool
                serve.wait_pool_ready()
            status, body, _ = get("127.0.0.1", serve.port, "burst.test", args.timeout)
            if status != 200:
                raise SystemExit(f"burst.test: GET / gave {status}: {body[:200]!r}")
            return body.decode().strip()

        def burst(label: str, ip: str, port: int) -> None:
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.clients) as pool:
                results = list(pool.map(lambda _: get(ip, port, "burst.test", args.timeout), range(args.clients)))
            bad = [(status, body[:100]) for status, body, _ in results if status != 200]
            if bad:
                raise SystemExit(f"{label}: {len(bad)} failed requests: {bad[:3]}")
            times[label].extend(ms for _, _, ms in results)

        for i in range(args.rounds):
            for label in (("direct", "serve") if i % 2 == 0 else ("serve", "direct")):
                ip = fresh_instance()
                burst(label, *((ip, 80) if label == "direct" else ("127.0.0.1", serve.port)))
    finally:
        serve.stop()
        serve.reap_leftovers()
        shutil.rmtree(work, ignore_errors=True)
    out = {"benchmark": "a burst of concurrent GETs to a fresh apache-php instance", "rounds": args.rounds,
           "clients": args.clients, "workers": args.workers or "image default"}
    for label, values in times.items():
        out[label] = {**summary(values), "over_1s": sum(1 for ms in values if ms > 1000)}
    out["serve_p99_over_direct_p99"] = round(percentile(times["serve"], 99) / percentile(times["direct"], 99), 2)
    out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
