#!/usr/bin/env python3
"""A cold start through `fcrun serve` on SQLite vs on PostgreSQL, same run, same pool (issue 14).

Two real `fcrun serve` run side by side, identical but for the CMDB: one on its embedded SQLite,
one on a private PostgreSQL server (tests/pgserver.py: initdb in a temporary directory, a unix
socket, fsync on). Each has a fork-server pool of one pre-warmed apache-php instance. A run is
one GET / on a fresh connection for an app with no instance, timed to the last byte of
phpinfo, served by a claim from the pool (X-Fcrun-Cold-Start-Path must say "pool"); the app is
then scaled to 0 and the pool refilled. Runs alternate between the two serves (the order
rotates each round), never overlapping.

On PostgreSQL serve is a shared-CMDB serve: before it claims from its pool it claims a share of
the app's max in the database (one transaction under an advisory lock, serve/manager.py), on
the request path; its other writes (the instance row, the `start` event) are queued off it on
both. So the difference is what sharing a CMDB costs a cold start.

Needs root, the postgresql package, psycopg, and the apache-php image (`fcrun image build
apache-php`). Private roots, cgroup parents, bridges (10.241.0.0/24, 10.241.1.0/24); talks only
to 127.0.0.1 and those. Everything it makes is removed at the end.
Usage: bench/cmdb_coldstart.py [--runs 40] [--warmup 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchlib import preflight, summary, work_dir_with_site  # noqa: E402
from pgserver import PgServer, pg_bindir  # noqa: E402

from fcrun.cmdb.models import Scale  # noqa: E402
from fcrun.serve.testing import ServeProcess  # noqa: E402

CPU, MEMORY = 1.0, 512 << 20


def wait_until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"cmdb_coldstart: {what}: not within {timeout_s:g} s")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if code := preflight("bench/cmdb_coldstart.py"):
        return code
    bindir = pg_bindir()
    if bindir is None:
        print("cmdb_coldstart: PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-cmdb-cold-", "<?php phpinfo();\n")
    pg = PgServer(bindir, fsync=True).start()
    serves: dict[str, ServeProcess] = {}
    times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    header_ms: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    left: dict[str, list[str]] = {}
    t_begin = time.monotonic()
    try:
        for i, (name, cmdb) in enumerate((("sqlite", ""), ("postgresql", f'[cmdb]\nurl = "{pg.new_database()}"\n'))):
            root = os.path.join(work, name)
            os.makedirs(root)
            serves[name] = ServeProcess(root, args.image_root, cgroup_parent=f"fcrun-cmdbcold-{tag}-{i}",
                                        bridge=f"fcq{tag}{i}"[:15], subnet=f"10.241.{i}.0/24", docroot_roots=(work,),
                                        extra_config=f"[forkserver]\npool_size = 1\n{cmdb}")
        for serve in serves.values():
            serve.cli("app", "add", "pool.test", "--image", "apache-php", "--cpu", str(CPU), "--memory",
                      f"{MEMORY >> 20}M", "--docroot", site, "--idle-timeout", "600s")
            serve.start()
        admins = {name: serve.admin() for name, serve in serves.items()}

        def run(name: str, record: bool) -> None:
            serve = serves[name]
            serve.wait_pool_ready()
            t0 = time.perf_counter()
            status, headers, body = serve.request("pool.test")
            elapsed = (time.perf_counter() - t0) * 1000
            if status != 200 or b"phpinfo()" not in body:
                raise SystemExit(f"{name}: GET / gave {status}: {body[:300]!r}")
            if headers.get("X-Fcrun-Cold-Start-Path") != "pool":
                raise SystemExit(f"{name}: not served from the pool: {headers}")
            if record:
                times[name].append(elapsed)
                header_ms[name].append(float(headers["X-Fcrun-Cold-Start"]))
            admins[name].scale("pool.test", Scale(instances=0))
            wait_until(lambda: admins[name].stats("pool.test")["pool.test"].instances.total == 0,
                       f"{name}: pool.test scaled to 0")

        order = list(serves)
        for i in range(args.warmup + args.runs):
            for name in order[i % 2:] + order[:i % 2]:
                run(name, i >= args.warmup)
    finally:
        for name, serve in serves.items():
            with contextlib.suppress(Exception):
                serve.stop()
            left[name] = serve.reap_leftovers()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    s = {name: summary(v, digits=2) for name, v in times.items()}
    h = {name: summary(v, digits=2) for name, v in header_ms.items()}
    added_p50 = round(s["postgresql"]["median_ms"] - s["sqlite"]["median_ms"], 2)
    out = {
        "benchmark": "cold start from the pool through fcrun serve, SQLite vs PostgreSQL CMDB: GET / to the last "
                     "byte of phpinfo",
        "runs": args.runs,
        "warmup": args.warmup,
        "sqlite": s["sqlite"],
        "postgresql": s["postgresql"],
        "serve_header_ms": h,
        "postgresql_added_p50_ms": added_p50,
        "postgresql_added_p99_ms": round(s["postgresql"]["p99_ms"] - s["sqlite"]["p99_ms"], 2),
        "targets": {"added_p50_le_1ms": added_p50 <= 1.0},
        "notes": ["two serves side by side, the same pool size and limits; runs alternate, never overlap",
                  "PostgreSQL: a private server on a unix socket, fsync on; its serve claims a share of the app's "
                  "max in the database on the request path"],
        "left_after_stop": left,
        "serve_exit_ok": {name: serve.exit_codes == [0] for name, serve in serves.items()},
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round(time.monotonic() - t_begin, 1),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
