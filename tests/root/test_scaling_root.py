"""Reactive scaling on the real kernel: the saturation signal from a container's own CFS figures,
then end to end with a real `fcrun serve`, real Apache/PHP containers and a CPU-heavy PHP script
as the load.

Saturation is "throttled, and using its whole quota". Another process busy on the host (a noisy
neighbour) can keep an instance from reaching its quota, and then it is rightly not saturated;
so the quotas here are small (0.05-0.1 CPU) next to what any
host running the suite has to spare, and every wait's bound only keeps a broken policy from
hanging the suite.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest
from polling import wait_until
from serving import Server, serving

from fcrun.cmdb.models import App
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.serve import monitor, policy

pytestmark = [pytest.mark.root, pytest.mark.slow]

# About 5 ms of CPU per request: an instance at 0.05 CPU saturates at ~10 requests/s.
BURN_PHP = "<?php $x = 0; for ($i = 0; $i < 300000; $i++) { $x += $i % 7; } echo 'burnt ', $x;"


@pytest.fixture
def server(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n") as srv:  # counts containers: no pool
        site = tmp_path / "site"
        site.mkdir()
        (site / "burn.php").write_text(BURN_PHP)
        (site / "hello.txt").write_text("hello\n")  # a cold start that is no load once served
        srv.site = str(site)
        yield srv


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


def test_a_busy_loop_at_its_quota_reads_as_saturated_and_the_policy_scales_it_up(runtime, busybox):
    """What serve's monitor computes from a real cgroup, fed to the real policy: a busy loop at a
    small quota (5 ms per 100 ms period: it runs out in every period unless the host leaves it
    less than 5 % of a CPU) with one request in flight is throttled and uses its whole quota, so
    the policy raises its quota once the signal has held for sustain_up_s. Samples span ten
    periods: the kernel charges the quota at its tick (4 ms at HZ=250), so one period's share
    swings by a tick; ten periods' average does not."""
    spec = spec_from_image(busybox, RunOptions(args=["sh", "-c", "while :; do :; done"], cpu=0.05, network="none"),
                           name="t-busy")
    runtime.run("t-busy", spec, image=busybox, detach=True)
    cgroup = runtime.cgroup("t-busy")
    app = App(name="busy.test", image="busybox", cpu=0.05, cpu_max=0.2, max_instances=1)
    tuning = policy.Tuning()
    started = time.monotonic()
    last = monitor.reading(started, cgroup.stats(), busy_s=0.0, completed=0, latency_s=0.0)
    history, plans = policy.History(), []
    for _ in range(2):  # the first sample starts the hot run, the second acts on it
        wait_until("ten more CFS periods", lambda: cgroup.stats().nr_periods >= last.nr_periods + 10)
        now = time.monotonic()
        current = monitor.reading(now, cgroup.stats(), busy_s=now - started, completed=0, latency_s=0.0)
        figures = monitor.figures("t-busy", 0.05, started, last, current)
        assert figures.throttled >= tuning.throttled_high, figures
        assert figures.quota_used >= tuning.busy_high, figures
        plan = policy.decide(policy.AppMetrics(app=app, instances=(figures,), history=history), now, tuning)
        history, last = plan.history, current
        plans.append(plan)
    assert plans[0].decisions == ()  # one hot sample is not enough
    (decision,) = plans[1].decisions
    assert (decision.action, decision.instance, decision.cpu) == ("scale-up", "t-busy", 0.1), decision
    assert "t-busy throttled in" in decision.reason and "cpu 0.05 -> 0.1" in decision.reason
    runtime.delete("t-busy", force=True)


def test_cpu_heavy_load_scales_up_then_out_and_back_down_to_zero(server):
    server.cli("app", "add", "burn.test", "--image", "apache-php", "--docroot", server.site, "--cpu", "0.05",
               "--cpu-max", "0.1", "--memory", "256M", "--max", "2", "--cooldown-up", "1s", "--cooldown-down", "2s",
               "--idle-timeout", "8s")
    server.start()
    assert server.request("burn.test", "/hello.txt")[0] == 200  # cold start
    (first,) = server.containers()
    # Its quota starts at --cpu: the first scale-up's event says "cpu 0.05 -> 0.1". It is not
    # read here: on a loaded host, Apache finishing its own start can already saturate 0.05 CPU.

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
            # Throttled at 0.05 CPU: the quota is raised live, to the ceiling (typically within a
            # second; no timing is asserted, the bound only keeps a broken policy from hanging).
            up = wait_until("a scale-up", lambda: [e for e in scale_events(server) if e[1] == "scale-up"], 60, 0.2)
            assert f"{first} throttled in" in up[0][2] and "cpu 0.05 -> 0.1" in up[0][2]
            assert quota_cpus(server, first) == pytest.approx(0.1)
            # Still saturated at the ceiling: a second instance, after the up cooldown.
            out = wait_until("a scale-out", lambda: [e for e in scale_events(server) if e[1] == "scale-out"], 60, 0.2)
            assert "at the cpu ceiling 0.1" in out[0][2]
            # After the scale-up (the cooldown between them is the policy's, checked on a fake
            # clock in test_policy and test_manager: events are stamped when written, not decided).
            kinds = [kind for _, kind, _ in scale_events(server)]
            assert kinds.index("scale-up") < kinds.index("scale-out"), kinds
            wait_until("two instances", lambda: len(server.containers()) == 2, 60, 0.2)
            second = next(n for n in server.containers() if n != first)
            # It takes requests too, and gets its own scale-up once throttled.
            wait_until("the second scale-up", lambda: [e for e in scale_events(server)
                                                       if e[1] == "scale-up" and second in e[2]], 60, 0.2)
            assert quota_cpus(server, second) == pytest.approx(0.1)
        finally:
            stop.set()
            for w in workers:
                w.result()
    load_stopped = time.time()
    assert statuses and set(statuses) == {200}

    # Load gone: after the down cooldown one instance drains and stops, the other's quota falls
    # back to --cpu; with no request at all, idle-timeout stops the last one.
    wait_until("zero instances", lambda: server.containers() == [], 60, 0.5)
    events = [e for e in scale_events(server) if e[0] >= load_stopped]
    kinds = [k for _, k, _ in events]
    assert kinds.index("scale-in") < kinds.index("scale-down"), events
    assert "load fits in 1 instance" in events[kinds.index("scale-in")][2]
    assert "cpu 0.1 -> 0.05" in events[kinds.index("scale-down")][2]
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
