"""Reactive scaling end to end: a real `fcrun serve`, real Apache/PHP containers, a CPU-heavy
PHP script as the load, the kernel's own CFS quota and throttling figures."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest
from hostcheck import host_snapshot, settled_snapshot
from test_serve_root import Server

pytestmark = [pytest.mark.root, pytest.mark.slow]

# About 5 ms of CPU per request: an instance at 0.2 CPU saturates at ~40 requests/s.
BURN_PHP = "<?php $x = 0; for ($i = 0; $i < 300000; $i++) { $x += $i % 7; } echo 'burnt ', $x;"


@pytest.fixture
def server(tmp_path, apache_php):
    before = host_snapshot(str(tmp_path / "run"))
    srv = Server(tmp_path, apache_php, extra_config="[forkserver]\npool_size = 0\n")  # counts containers: no pool
    site = tmp_path / "site"
    site.mkdir()
    (site / "burn.php").write_text(BURN_PHP)
    srv.site = str(site)
    try:
        yield srv
    finally:
        srv.stop()
        leftover = srv.reap_leftovers()
    assert srv.proc is None or srv.proc.returncode == 0, srv.read_log()
    assert leftover == [], "serve left instances behind"
    assert settled_snapshot(str(tmp_path / "run"), before) == before


def quota_cpus(srv: Server, name: str) -> float:
    """The instance's CPU quota as the kernel has it (cpu.max on v2, cfs_quota_us on v1)."""
    from fcrun.runtime.state import StateStore

    paths = StateStore(os.path.join(srv.run_root, "containers")).load(name).cgroup_paths
    cpu_dir = paths.get("cpu") or paths.get("unified") or next(iter(paths.values()))
    if os.path.exists(os.path.join(cpu_dir, "cpu.max")):
        quota, period = _read(cpu_dir, "cpu.max").split()
    else:
        quota, period = _read(cpu_dir, "cpu.cfs_quota_us"), _read(cpu_dir, "cpu.cfs_period_us")
    return int(quota) / int(period)


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def scale_events(srv: Server) -> list[tuple[float, str, str]]:
    import json

    out = json.loads(srv.cli("events", "burn.test", "--json", "-n", "1000").stdout)
    return [(e["ts"], e["kind"], e["message"]) for e in out if e["kind"] in
            ("scale-up", "scale-down", "scale-out", "scale-in", "start", "stop", "scale-failed")]


def wait_for(what: str, predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def test_cpu_heavy_load_scales_up_then_out_and_back_down_to_zero(server):
    server.cli("app", "add", "burn.test", "--image", "apache-php", "--docroot", server.site, "--cpu", "0.2",
               "--cpu-max", "0.4", "--memory", "256M", "--max", "2", "--cooldown-up", "1s", "--cooldown-down", "2s",
               "--idle-timeout", "8s")
    server.start()
    assert server.request("burn.test", "/burn.php")[0] == 200  # cold start
    (first,) = server.containers()
    assert quota_cpus(server, first) == pytest.approx(0.2)

    stop = threading.Event()
    statuses: list[int] = []

    def worker(_):
        while not stop.is_set():
            status, _, body = server.request("burn.test", "/burn.php")
            statuses.append(status)
            assert status == 200 and body.startswith("burnt "), (status, body[:200])

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        workers = [pool.submit(worker, i) for i in range(6)]
        try:
            # Throttled at 0.2 CPU: the quota is raised live, to the ceiling (typically within a
            # second; no timing is asserted, the bound only keeps a broken policy from hanging).
            up = wait_for("a scale-up", lambda: [e for e in scale_events(server) if e[1] == "scale-up"], 30)
            assert f"{first} throttled in" in up[0][2] and "cpu 0.2 -> 0.4" in up[0][2]
            assert quota_cpus(server, first) == pytest.approx(0.4)
            # Still saturated at the ceiling: a second instance, after the up cooldown.
            out = wait_for("a scale-out", lambda: [e for e in scale_events(server) if e[1] == "scale-out"], 10)
            assert out[0][0] - up[0][0] >= 1.0 - 0.05 and "at the cpu ceiling 0.4" in out[0][2]
            wait_for("two instances", lambda: len(server.containers()) == 2, 10)
            second = next(n for n in server.containers() if n != first)
            # It takes requests too, and gets its own scale-up once throttled.
            wait_for("the second scale-up", lambda: [e for e in scale_events(server)
                                                      if e[1] == "scale-up" and second in e[2]], 10)
            assert quota_cpus(server, second) == pytest.approx(0.4)
        finally:
            stop.set()
            for w in workers:
                w.result()
    load_stopped = time.time()
    assert statuses and set(statuses) == {200}

    # Load gone: after the down cooldown one instance drains and stops, the other's quota falls
    # back to --cpu; with no request at all, idle-timeout stops the last one.
    wait_for("zero instances", lambda: server.containers() == [], 25, 0.5)
    events = [e for e in scale_events(server) if e[0] >= load_stopped]
    kinds = [k for _, k, _ in events]
    assert kinds.index("scale-in") < kinds.index("scale-down"), events
    assert "load fits in 1 instance" in events[kinds.index("scale-in")][2]
    assert "cpu 0.4 -> 0.2" in events[kinds.index("scale-down")][2]
    assert events[-1][1] == "stop" and "idle" in events[-1][2]
    assert "scale-up" not in kinds and "scale-out" not in kinds and "scale-failed" not in kinds


def test_forced_scaling_with_autoscale_off(server):
    server.cli("app", "add", "burn.test", "--image", "apache-php", "--docroot", server.site, "--cpu", "0.2",
               "--cpu-max", "0.6", "--max", "2", "--no-autoscale")
    server.start()
    r = server.cli("app", "scale", "burn.test", "--cpu", "0.6", check=False)
    assert r.returncode == 5 and "no running instance" in r.stderr
    assert server.cli("app", "scale", "burn.test", "--instances", "2").stdout == "burn.test: 2 instances\n"
    names = server.containers()
    assert len(names) == 2
    assert server.cli("app", "scale", "burn.test", "--cpu", "0.6").stdout == "burn.test: cpu 0.6 per running instance\n"
    assert [quota_cpus(server, n) for n in names] == [pytest.approx(0.6)] * 2
    served = {server.request("burn.test", "/burn.php")[0] for _ in range(10)}
    assert served == {200}
    assert server.cli("app", "scale", "burn.test", "--instances", "1").stdout == "burn.test: 1 instance\n"
    assert len(server.containers()) == 1
    kinds = [k for _, k, _ in scale_events(server)]
    assert kinds.count("scale-out") == 1 and kinds.count("scale-up") == 2 and kinds.count("scale-in") == 1
    r = server.cli("app", "scale", "burn.test", "--instances", "3", check=False)
    assert r.returncode == 2 and "max_instances" in r.stderr
