#!/usr/bin/env python3
"""The CMDB on SQLite vs PostgreSQL, same run (issue 14's speed figures).

- per call, p50 and p90 over --calls calls: what a cold start has serve write (an instance row
  upsert and a `start` event; serve writes them off the request path, records.py) and the reads
  a Host lookup and an admin `get` make;
- change notification: from another writer's update_app call (its commit included) to a
  LISTENing connection hearing it (what AppWatch waits on), p50 and max;
- --apps apps (10,000 by default): open (connect + migrate) and list_apps, the reads serve makes
  at start, and this process's peak RSS so far (SQLite runs first).

PostgreSQL is a private server (tests/pgserver.py: initdb in a temporary directory, a unix
socket only) with fsync on, as SQLite's synchronous=FULL is; both on the same disk. Needs the
postgresql package and psycopg; root (the server runs as the postgres user) or that user.
With --serve (root), also a real `fcrun serve` (fork-server off) over --apps apps on each: the time
from exec to listening, and its VmRSS then.
Usage: bench/cmdb_backends.py [--calls 2000] [--apps 10000] [--serve] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pgserver import PgServer, pg_bindir  # noqa: E402

from fcrun.cmdb import App, AppUpdate, Instance, open_cmdb  # noqa: E402
from fcrun.paths import Paths  # noqa: E402


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50": round(statistics.median(samples) * 1000, 3),
            "p90": round(samples[int(len(samples) * 0.9)] * 1000, 3),
            "max": round(samples[-1] * 1000, 3)}


def per_call(db, calls: int) -> dict[str, dict[str, float]]:
    db.add_app(App(name="bench.test", image="apache-php", hostnames=["www.bench.test"]))
    timings: dict[str, list[float]] = {"cold start writes (upsert + event)": [], "app_for_host": [], "get_app": []}
    for i in range(calls):
        row = Instance(id=f"bench-{i}", app="bench.test", container=f"bench-{i}", state="ready", ip="10.0.0.2",
                       port=80, started_at=time.time())
        t0 = time.perf_counter()
        db.upsert_instance(row)
        db.add_event("bench.test", "start", f"started bench-{i}", {"cold_start_ms": 12.5})
        t1 = time.perf_counter()
        db.app_for_host("WWW.bench.test:80")
        t2 = time.perf_counter()
        db.get_app("bench.test")
        t3 = time.perf_counter()
        timings["cold start writes (upsert + event)"].append(t1 - t0)
        timings["app_for_host"].append(t2 - t1)
        timings["get_app"].append(t3 - t2)
    return {name: percentiles_ms(samples) for name, samples in timings.items()}


def notify_latency(url: str, changes: int) -> dict[str, float]:
    """Another writer's committed update -> a LISTENing connection hears it."""
    with open_cmdb(Paths(data_root="/nonexistent", run_root="/nonexistent"), url) as writer:
        listener = writer.listen_app_changes()
        heard: list[float] = []
        committed: list[float] = []
        try:
            def listen() -> None:
                while len(heard) < changes:
                    if listener.wait(1.0):
                        heard.append(time.perf_counter())

            thread = threading.Thread(target=listen)
            thread.start()
            for i in range(changes):
                # From the call (the commit is inside it) to the listener hearing it: an upper
                # bound (the listener may hear before the writer has its answer).
                committed.append(time.perf_counter())
                writer.update_app("bench.test", AppUpdate(cpu=0.5 + (i % 2) * 0.1))
                while len(heard) <= i:  # one change at a time, so each is its own notification
                    time.sleep(0.0002)
            thread.join()
        finally:
            listener.close()
    return percentiles_ms([h - c for h, c in zip(heard, committed)])


def many_apps(url: str | None, paths: Paths, apps: int) -> dict[str, float]:
    with open_cmdb(paths, url) as db:
        if len(db.list_apps()) < apps:
            from fcrun.cmdb import Dump
            from fcrun.cmdb.migrations import LATEST_VERSION

            now = time.time()
            existing = db.export_dump()
            if not existing.apps and not existing.events:
                db.import_dump(Dump(schema_version=LATEST_VERSION, apps=[
                    App(name=f"app{i}.test", image="apache-php", hostnames=[f"www.app{i}.test"], created_at=now,
                        updated_at=now) for i in range(apps)]))
    t0 = time.perf_counter()
    db = open_cmdb(paths, url)
    t1 = time.perf_counter()
    listed = db.list_apps()
    t2 = time.perf_counter()
    db.close()
    return {"apps": len(listed), "open_ms": round((t1 - t0) * 1000, 1), "list_apps_ms": round((t2 - t1) * 1000, 1),
            "maxrss_so_far_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def serve_start(url: str | None, work: str, apps: int) -> dict[str, float]:
    """A real `fcrun serve` (root; no fork-server, so only serve itself) over `apps` apps: the
    time from exec to listening with its admin socket up, and its VmRSS then."""
    import signal
    import socket
    import subprocess

    root = tempfile.mkdtemp(prefix="serve-", dir=work)
    paths = Paths(data_root=os.path.join(root, "data"), run_root=os.path.join(root, "run"))
    many_apps(url or None, paths, apps)  # the default SQLite file of that data root when url is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(root, "fcrun.toml")
    with open(config, "w") as f:
        f.write(f'listen = "127.0.0.1:{port}"\n[forkserver]\nenabled = false\n'
                '[runtime]\ncgroup_parent = "fcrun-bench-cmdb"\nbridge = "fcbcmdb0"\nsubnet = "10.237.0.0/24"\n')
    env = dict(os.environ, FCRUN_ROOT=paths.data_root, FCRUN_RUN=paths.run_root, FCRUN_LOG="WARNING")
    command = [sys.executable, "-m", "fcrun_cli", *(["--cmdb", url] if url else []), "serve", "--config", config]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if os.path.exists(os.path.join(paths.run_root, "admin.sock")):
                    break
            except OSError:
                pass
            time.sleep(0.005)
        started_s = time.perf_counter() - t0
        with open(f"/proc/{proc.pid}/status") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"apps": apps, "start_s": round(started_s, 2), "rss_mib": round(rss_kib / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--apps", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", action="store_true", help="also start a real `fcrun serve` on each (root)")
    args = parser.parse_args()
    bindir = pg_bindir()
    if bindir is None:
        print("cmdb_backends: PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    server = PgServer(bindir, fsync=True).start()
    work = tempfile.mkdtemp(prefix="fcrun-cmdb-bench-")
    result: dict = {}
    try:
        sqlite_url = f"sqlite://{work}/cmdb.sqlite3"
        pg_url = server.new_database()
        for name, url in (("sqlite", sqlite_url), ("postgresql", pg_url)):
            with open_cmdb(Paths(data_root=work, run_root=work), url) as db:
                result[name] = {"per_call_ms": per_call(db, args.calls)}
        result["postgresql"]["notify_ms"] = notify_latency(pg_url, 200)
        big_sqlite = f"sqlite://{work}/big.sqlite3"
        big_pg = server.new_database()
        for name, url in (("sqlite", big_sqlite), ("postgresql", big_pg)):
            result[name]["many_apps"] = many_apps(url, Paths(data_root=work, run_root=work), args.apps)
        if args.serve:
            result["sqlite"]["serve"] = serve_start(None, work, args.apps)
            result["postgresql"]["serve"] = serve_start(server.new_database(), work, args.apps)
    finally:
        server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, figures in result.items():
            print(name)
            for what, value in figures.items():
                print(f"  {what}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
