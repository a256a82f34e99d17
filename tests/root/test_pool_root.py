"""The fork-server, its pool of pre-warmed Apache/PHP instances, and the frozen tier, end to end:
a real `fcrun serve` (which starts the fork-server), real containers, real HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time

import pytest
from polling import running, wait_until
from serving import Server, serving, warming_site

from fcrun.forkserver import Client, ForkServerGone
from fcrun.forkserver import protocol as fsp

pytestmark = [pytest.mark.root, pytest.mark.slow]


class PoolServer(Server):
    def pool(self) -> fsp.PoolStatus:
        with Client(os.path.join(self.run_root, "forkserver.sock"), timeout_s=10) as fs:
            return fs.request(fsp.Status())

    def wait_pool(self, ready: int, image: str = "apache-php", timeout_s: float = 60) -> fsp.PoolStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.pool()
                if status.images.get(image) and status.images[image].ready >= ready:
                    return status
            except ForkServerGone:
                status = None  # restarting
            assert time.monotonic() < deadline, f"pool never reached {ready} ready: {status}\n{self.read_log()[-3000:]}"
            time.sleep(0.05)

    def ps(self) -> dict[str, dict]:
        rows = self.cli("ps").stdout.splitlines()
        head = rows[0].split()
        return {r.split()[0]: dict(zip(head, r.split())) for r in rows[1:]}


def _site(tmp_path, name: str, text: str) -> str:
    site = tmp_path / name
    site.mkdir()
    (site / "index.php").write_text(f"<?php echo '{text} on ', gethostname();")
    (site / f"only-{name}.txt").write_text(name)
    return str(site)


@pytest.fixture
def pooled(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 2\n", PoolServer) as srv:
        yield srv


def test_a_cold_app_is_served_from_the_pool_which_refills(pooled, tmp_path):
    site = _site(tmp_path, "alpha", "alpha says hi")
    pooled.cli("app", "add", "alpha.test", "--image", "apache-php", "--docroot", site, "--cpu", "0.5", "--memory", "256M")
    pooled.start()
    status = pooled.wait_pool(2)
    pooled_names = {n for n, row in pooled.ps().items() if row["APP"] == "-"}
    assert len(pooled_names) == 2 and all(pooled.ps()[n]["STATE"] == "frozen" for n in pooled_names)

    code, headers, body = pooled.request("alpha.test")
    assert code == 200 and "alpha says hi" in body
    assert headers["X-Fcrun-Cold-Start-Path"] == "pool"
    claimed = [n for n, row in pooled.ps().items() if row["APP"] == "alpha.test"]
    assert len(claimed) == 1 and claimed[0] in pooled_names  # one of the pooled instances, now the app's
    row = pooled.ps()[claimed[0]]
    assert (row["STATE"], row["CPU"], row["MEMORY"]) == ("running", "0.5", "256M")  # the app's limits

    after = pooled.wait_pool(2)  # refilled in the background
    assert after.images["apache-php"].claimed == status.images["apache-php"].claimed + 1
    assert pooled.request("alpha.test")[0] == 200


def test_a_claimed_instance_is_routed_only_once_its_apps_ready_path_answers_2xx(pooled, tmp_path):
    site = warming_site(tmp_path / "warming", warming=2)
    pooled.cli("app", "add", "warm.test", "--image", "apache-php", "--docroot", site, "--ready-path", "/healthz.php")
    pooled.start()
    pooled.wait_pool(2)
    code, headers, body = pooled.request("warm.test")
    assert code == 200 and headers["X-Fcrun-Cold-Start-Path"] == "pool", body
    assert body == "probed 3 times, as warm.test"  # the pool's own checks only connect: no GET before the claim


def test_a_claimed_instance_sees_only_its_own_apps_docroot(pooled, tmp_path):
    sites = {name: _site(tmp_path, name, f"{name} here") for name in ("red", "blue")}
    for name, site in sites.items():
        pooled.cli("app", "add", f"{name}.test", "--image", "apache-php", "--docroot", site)
    pooled.start()
    pooled.wait_pool(2)
    for name in sites:
        code, headers, body = pooled.request(f"{name}.test")
        assert code == 200 and f"{name} here" in body and headers["X-Fcrun-Cold-Start-Path"] == "pool"
    instances = {row["APP"]: n for n, row in pooled.ps().items() if row["APP"] != "-"}
    for name, other in (("red", "blue"), ("blue", "red")):
        out = pooled.cli("exec", instances[f"{name}.test"], "--", "sh", "-c",
                         "ls /var/www/html; cat /proc/self/mountinfo").stdout
        assert f"only-{name}.txt" in out and f"only-{other}.txt" not in out
        assert sites[other] not in out  # the other app's directory is mounted nowhere in it
        # Its files come read-only, nosuid, nodev, noexec, and nothing above the docroot is reachable.
        docroot_line = [line for line in out.splitlines() if " /var/www/html " in line][-1]
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(docroot_line.split()[5].split(","))
    # Disposable: a claimed instance never returns to the pool, even after its app is gone.
    pooled.cli("app", "rm", "red.test")
    assert instances["red.test"] not in pooled.ps()


def test_an_idle_instance_is_frozen_and_thawed_by_the_next_request(pooled, tmp_path):
    site = _site(tmp_path, "cold", "still here")
    pooled.cli("app", "add", "cold.test", "--image", "apache-php", "--docroot", site, "--freeze-after", "1s",
               "--idle-timeout", "120s")
    pooled.start()
    code, headers, _ = pooled.request("cold.test")
    assert code == 200
    first_path = headers["X-Fcrun-Cold-Start-Path"]  # pool, or start if the pool was not filled yet
    (name,) = [n for n, row in pooled.ps().items() if row["APP"] == "cold.test"]
    deadline = time.monotonic() + 10
    while pooled.ps()[name]["STATE"] != "frozen":
        assert time.monotonic() < deadline, "the idle instance was not frozen"
        time.sleep(0.1)
    # A frozen instance still holds its memory, and both ps and the metrics say how much.
    assert pooled.ps()[name]["USED"] != "-"
    from fcrun.serve.admin_client import AdminClient

    metrics = AdminClient(os.path.join(pooled.run_root, "admin.sock")).metrics_text()
    frozen_memory = [line for line in metrics.splitlines()
                     if line.startswith('fcrun_memory_bytes{app="cold.test",state="frozen"}')]
    assert frozen_memory and float(frozen_memory[0].split()[-1]) > 0
    assert 'fcrun_instances{app="cold.test",state="frozen"} 1' in metrics
    assert 'fcrun_instances{app="cold.test",state="ready"} 0' in metrics
    # Frozen means no progress: its CPU time stands still.
    cpu = [line for line in metrics.splitlines() if line.startswith('fcrun_cpu_seconds_total{app="cold.test"}')]
    time.sleep(0.5)
    metrics = AdminClient(os.path.join(pooled.run_root, "admin.sock")).metrics_text()
    assert cpu == [line for line in metrics.splitlines() if line.startswith('fcrun_cpu_seconds_total{app="cold.test"}')]

    code, headers, body = pooled.request("cold.test")
    assert code == 200 and "still here" in body
    assert headers["X-Fcrun-Cold-Start-Path"] == "thaw"
    assert pooled.ps()[name]["STATE"] == "running"
    metrics = AdminClient(os.path.join(pooled.run_root, "admin.sock")).metrics_text()
    assert 'fcrun_cold_starts_total{app="cold.test",path="thaw"} 1' in metrics
    # The histograms count what happened: two requests, each a cold start (first_path, then
    # thaw); a path no request took has no histogram.
    assert _sample(metrics, 'fcrun_request_duration_seconds_count{app="cold.test"}') == 2
    assert _sample(metrics, 'fcrun_request_duration_seconds_bucket{app="cold.test",le="+Inf"}') == 2
    assert _sample(metrics, 'fcrun_requests_total{app="cold.test",code="2xx"}') == 2
    for path in (first_path, "thaw"):
        assert _sample(metrics, f'fcrun_cold_start_duration_seconds_count{{app="cold.test",path="{path}"}}') == 1
        assert _sample(metrics, f'fcrun_cold_start_duration_seconds_sum{{app="cold.test",path="{path}"}}') > 0
    (unused,) = {"pool", "start"} - {first_path}
    assert f'fcrun_cold_start_duration_seconds_count{{app="cold.test",path="{unused}"}}' not in metrics
    (build,) = [line for line in metrics.splitlines() if line.startswith("fcrun_build_info{")]
    assert 'version="' in build and 'python="' in build and build.endswith(" 1")
    assert re.search(r'cgroup="v[12]"', build), build


def _sample(metrics: str, series: str) -> float:
    """The value of one series in a /metrics text (it must be there exactly once)."""
    (value,) = [line.rpartition(" ")[2] for line in metrics.splitlines() if line.rpartition(" ")[0] == series]
    return float(value)


def test_killing_the_forkserver_under_load_loses_no_request_and_serve_recovers(pooled, tmp_path):
    warm_site = _site(tmp_path, "warm", "warm")
    pooled.cli("app", "add", "warm.test", "--image", "apache-php", "--docroot", warm_site)
    cold = [f"c{i}.test" for i in range(6)]
    for host in cold:  # an environment of their own: started by the fork-server, not claimed
        pooled.cli("app", "add", host, "--image", "apache-php", "--docroot", _site(tmp_path, host[:2], host),
                   "--env", "APP=" + host)
    pooled.start()
    assert pooled.request("warm.test")[0] == 200
    first = pooled.wait_pool(2)

    def hammer_warm(stop_at: float) -> list[tuple[int, str]]:
        out = []
        while time.monotonic() < stop_at:
            code, _, body = pooled.request("warm.test", timeout=30)
            out.append((code, body))
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cold) + 2) as ex:
        warm = [ex.submit(hammer_warm, time.monotonic() + 3.0) for _ in range(2)]
        starts = [ex.submit(pooled.request, host, "/", "GET", None, None, 30) for host in cold]
        time.sleep(0.08)  # the fork-server is creating the cold apps' instances, one after the other
        os.kill(first.pid, signal.SIGKILL)
        results = [f.result() for f in starts]
        warm_results = [r for f in warm for r in f.result()]

    assert warm_results and all(code == 200 for code, _ in warm_results), "a request to a running instance failed"
    for code, _, body in results:
        assert code in (200, 503), (code, body)
        if code == 503:
            assert "fork-server" in body  # a clear reason, and a retry will do
    second = pooled.wait_pool(2)
    assert second.pid != first.pid  # serve started a new one, which refilled the pool
    for host in cold:  # everything works again
        code, _, body = pooled.request(host)
        assert code == 200 and host in body
    assert any("forkserver-exit" in line for line in pooled.cli("events").stdout.splitlines())


def test_stopping_serve_removes_the_pool_and_the_forkserver(pooled, tmp_path):
    site = _site(tmp_path, "bye", "bye")
    pooled.cli("app", "add", "bye.test", "--image", "apache-php", "--docroot", site)
    pooled.start()
    status = pooled.wait_pool(2)
    assert pooled.request("bye.test")[0] == 200
    pooled.wait_pool(2)
    pooled.stop()
    assert pooled.proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(status.pid, 0)  # the fork-server is gone too
    assert not os.path.exists(os.path.join(pooled.run_root, "forkserver.sock"))
    # (the fixture then checks that no container, mount, netns, veth or cgroup is left)


def _primers(srv) -> dict[str, list[int]]:
    """The move primers' groups beneath srv's cgroup parent: name -> pids in it."""
    from fcrun.cgroups import detect
    from fcrun.cgroups.primer import group_name, is_group_name

    driver = detect(parent=srv.cgroup_parent)
    parent = os.path.dirname(driver.paths_for(group_name(0))[driver.keys[0]])
    names = [n for n in os.listdir(parent) if is_group_name(n)] if os.path.isdir(parent) else []
    return {n: driver.load(driver.paths_for(n)).pids() for n in names}


def test_a_killed_fork_servers_move_primer_dies_with_it_and_its_group_goes(pooled, tmp_path):
    """Where a creation moves its child (v2), the fork-server keeps a move primer; on v1 the
    child joins its cgroup itself (cgroups/v1.py) and no fork-server starts one."""
    from fcrun.cgroups import detect

    site = _site(tmp_path, "gamma", "gamma")  # an app of the image, so that it is pooled
    pooled.cli("app", "add", "gamma.test", "--image", "apache-php", "--docroot", site)
    pooled.start()
    first = pooled.wait_pool(1).pid
    if detect(parent=pooled.cgroup_parent).self_join_is_cheap:
        assert _primers(pooled) == {}
        os.kill(first, signal.SIGKILL)  # serve starts another fork-server
        assert pooled.wait_pool(1).pid != first and _primers(pooled) == {}
        return
    (name, pids), = _primers(pooled).items()  # one primer, alone in its group
    assert name.rstrip("_") == f"fcrun-move-primer-{first}" and len(pids) == 1
    os.kill(first, signal.SIGKILL)  # serve starts another fork-server
    wait_until("the primer gone with its fork-server (PR_SET_PDEATHSIG)", lambda: not running(pids[0]), timeout_s=10)
    second = pooled.wait_pool(1).pid
    assert second != first
    wait_until("the dead primer's group removed by the new fork-server's gc", lambda: name not in _primers(pooled),
               timeout_s=10, detail=lambda: _primers(pooled))
    (new_name, new_pids), = _primers(pooled).items()
    assert new_name.rstrip("_") == f"fcrun-move-primer-{second}" and len(new_pids) == 1 and running(new_pids[0])
