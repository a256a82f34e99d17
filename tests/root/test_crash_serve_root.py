"""The crash suite, serve's part: `kill -9` of `fcrun serve` at each step of its scale actions
(fcrun/crashpoints.py), of the fork-server in a claim, and of serve and the fork-server while a
client sends requests; then a restart, which must reconcile: the host as before apart from
the instances that should run, the CMDB's instance rows those instances, every request
answered afterwards.

Requests across crashes: a request the proxy accepted before a crash gets a response or a
reset connection, never a hang; a request sent while serve is down is refused. The counts go
to $FCRUN_CRASH_RESULTS/crash-serve.json when that is set (bench/results/ holds a run's).
Rounds: each of serve's steps once (scale, freeze, thaw and the removal its stop makes), each
claim case once, and 3 crashes of each process under traffic (CI, ~50 s);
FCRUN_CRASH_SERVE_KILLS=N kills each N times under traffic instead.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from serving import Server, serving

from fcrun.cmdb import open_cmdb
from fcrun.forkserver import Client, ForkServerGone
from fcrun.forkserver import protocol as fsp
from fcrun.paths import Paths

pytestmark = [pytest.mark.root, pytest.mark.slow]

APP = "crash.test"
KILLS = int(os.environ.get("FCRUN_CRASH_SERVE_KILLS", "3") or 3)
HANG_S = 20.0  # a request with no answer for this long counts as lost (a hang)
RESULTS: dict[str, dict] = {}


class CrashServer(Server):
    def crash_at(self, step: str, mark: str | None = None) -> None:
        """The next start runs with FCRUN_CRASH_AT=step (and FCRUN_CRASH_MARK: one death in all)."""
        self.env["FCRUN_CRASH_AT"] = step
        if mark:
            self.env["FCRUN_CRASH_MARK"] = mark

    def no_crash(self) -> None:
        self.env.pop("FCRUN_CRASH_AT", None)
        self.env.pop("FCRUN_CRASH_MARK", None)

    def died_by_sigkill(self) -> None:
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not die at {self.env.get('FCRUN_CRASH_AT')}:\n{self.read_log()[-3000:]}") from None
        assert rc == -signal.SIGKILL, (rc, self.read_log()[-3000:])
        self.log.close()

    def restart(self) -> None:
        self.no_crash()
        # The dead serve's fork-server stops when its parent is gone (removing its pool): wait
        # for that, so the new serve's starts a fresh one rather than meeting the old one.
        deadline = time.monotonic() + 30
        while os.path.exists(os.path.join(self.run_root, "forkserver.sock")) and self._forkserver_answers():
            assert time.monotonic() < deadline, "the dead serve's fork-server never stopped"
            time.sleep(0.05)
        self.start()
        self.wait_reconciled()

    def _forkserver_answers(self) -> bool:
        try:
            with Client(os.path.join(self.run_root, "forkserver.sock"), timeout_s=2) as fs:
                fs.request(fsp.Status())
            return True
        except (ForkServerGone, OSError):
            return False

    def wait_reconciled(self) -> None:
        """serve reconciles before it serves the admin API; one request through it shows that."""
        self.cli("app", "ls")

    def instance_rows(self) -> list[str]:
        cmdb = open_cmdb(Paths(data_root=self.data_root, run_root=self.run_root))
        try:
            return sorted(row.id for row in cmdb.list_instances())
        finally:
            cmdb.close()

    def running(self) -> list[str]:
        rows = self.cli("ps").stdout.splitlines()[1:]
        return sorted(r.split()[0] for r in rows if r.split()[1] in ("running", "frozen"))


def _site(tmp_path) -> str:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "index.php").write_text("<?php echo 'crash site on ', gethostname();")
    return str(site)


@pytest.fixture
def crashing(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 0\n", CrashServer) as srv:
        srv.cli("app", "add", APP, "--image", "apache-php", "--docroot", _site(tmp_path))
        yield srv


# step -> (what makes serve reach it, how many instances run after the restart)
SERVE_STEPS = {
    # started, then killed before the manager or the CMDB knew: adopted (it runs, it is the app's)
    "serve.instance.started": ("request", 1),
    # the new quota written, its row not: adopted, the quota as the kernel has it
    "serve.scale-up.written": ("scale-cpu", 1),
    # scale-in drained it, then serve died before the stop: it still runs, adopted again
    "serve.instance.drained": ("scale-in", 1),
    # stopped, then serve died before its row went: nothing runs, the stale row goes
    "serve.instance.stopped": ("scale-in", 0),
    # serve's stop killed it, then died removing it: the new serve's fork-server's gc finishes
    **{step: ("scale-in", 0) for step in ("delete.locked", "delete.cgroup", "delete.network", "delete.done")},
    # frozen when idle, then serve died: adopted frozen, the next request thaws it
    "freeze.frozen": ("idle", 1),
    # a request thawed it, then serve died: adopted running
    "thaw.thawed": ("idle-then-request", 1),
}


@pytest.mark.parametrize("step", sorted(SERVE_STEPS))
def test_kill_9_of_serve_at_a_scale_step_then_restart_reconciles(crashing, step):
    trigger, running_after = SERVE_STEPS[step]
    if trigger.startswith("idle"):
        crashing.cli("app", "update", APP, "--freeze-after", "1s")
    crashing.crash_at(step)
    crashing.start()
    if trigger != "request":
        assert crashing.request(APP)[0] == 200
    match trigger:
        case "idle":
            pass  # frozen after 1 s idle: serve dies there
        case "idle-then-request":
            _wait_for(lambda: [r["status"] for r in _ps(crashing).values()] == ["frozen"], "never frozen")
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                crashing.request(APP)
        case "request":
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                crashing.request(APP)  # accepted, then serve died: a reset, not a hang
        case "scale-cpu":
            assert crashing.cli("app", "scale", APP, "--cpu", "0.7", check=False).returncode != 0
        case "scale-in":
            assert crashing.cli("app", "scale", APP, "--instances", "0", check=False).returncode != 0
    crashing.died_by_sigkill()
    crashing.restart()
    running = crashing.running()
    assert len(running) == running_after, (step, running, crashing.read_log()[-3000:])
    assert sorted(_ps(crashing)) == running, f"{step}: the reconcile left a dead or half-made container"
    assert crashing.instance_rows() == running, "the CMDB's instance rows are not what runs"
    status, headers, body = crashing.request(APP)
    assert status == 200 and "crash site" in body
    if running_after:  # served by the adopted instance, not a new one
        assert headers.get("X-Fcrun-Cold-Start-Path", "thaw") == "thaw" and crashing.running() == running
    if trigger == "idle":
        assert headers["X-Fcrun-Cold-Start-Path"] == "thaw"  # adopted frozen, thawed by the request
    if step == "serve.scale-up.written":
        assert "0.7" in crashing.cli("ps").stdout  # the quota the kernel has, adopted
    RESULTS.setdefault("steps", {"crashes": 0, "passed": []})
    RESULTS["steps"]["crashes"] += 1
    RESULTS["steps"]["passed"].append(step)


@pytest.fixture
def pooling(tmp_path, apache_php):
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 1\n", CrashServer) as srv:
        srv.cli("app", "add", APP, "--image", "apache-php", "--docroot", _site(tmp_path))
        yield srv


def _pool_status(srv: CrashServer) -> fsp.PoolStatus | None:
    try:
        with Client(os.path.join(srv.run_root, "forkserver.sock"), timeout_s=5) as fs:
            return fs.request(fsp.Status())
    except (ForkServerGone, OSError):
        return None  # restarting


def _ps(srv: CrashServer) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(srv.cli("ps", "--json").stdout)}


# claim step -> whether the pooled instance it worked on runs afterwards, and whose it is
CLAIM_CASES = {
    "claim.taken": "pool",  # untouched: the new fork-server pools it again
    "claim.slot": None,  # the app's docroot mounted, its label unsaved: removed, never pooled again
    # answered (serve sends it the request), its label unsaved: the new fork-server labels it
    # the app's from the note its claim left, and serve adopts it
    "claim.answered": APP,
    "claim.saved": APP,  # the app's: serve's reconcile after the fork-server restart adopts it
}
# what the request whose claim crashed gets: a clear 503, or, once the claim was answered, the
# page (the instance runs; the fork-server died only after answering)
FIRST_ANSWER = {"claim.answered": 200, "claim.saved": 200}


@pytest.mark.parametrize("step", sorted(CLAIM_CASES))
def test_kill_9_of_the_forkserver_in_a_claim_then_its_restart_reconciles(pooling, step, tmp_path):
    pooling.crash_at(step, mark=str(tmp_path / "crashed"))  # the restarted fork-server inherits it: once
    pooling.start()
    _wait_for(lambda: (s := _pool_status(pooling)) is not None and s.images.get("apache-php")
              and s.images["apache-php"].ready == 1, "the pool never got its instance", 60)
    first = _pool_status(pooling).pid
    [pooled] = [name for name, row in _ps(pooling).items() if row["status"] == "frozen"]
    status, _, body = pooling.request(APP)
    if FIRST_ANSWER.get(step) == 200:
        assert status == 200 and "crash site" in body, (status, body)
    else:
        assert status == 503 and "fork-server" in body, (status, body)  # a clear reason; a retry will do
    assert os.path.exists(tmp_path / "crashed")
    _wait_for(lambda: (s := _pool_status(pooling)) is not None and s.pid != first, "no new fork-server", 30)
    pooling.wait_reconciled()
    status, _, body = pooling.request(APP)
    assert status == 200 and "crash site" in body, (status, body)
    ps = _ps(pooling)
    owner = CLAIM_CASES[step]
    if owner is None:
        assert pooled not in ps, f"{step}: a half-claimed instance survived: {ps[pooled]}"
    else:
        assert pooled in ps and ps[pooled]["labels"].get("fcrun.app", "pool") in (owner, APP), ps[pooled]
    apps = [name for name, row in ps.items() if row["labels"].get("fcrun.app") == APP]
    assert len(apps) == 1, ps  # one instance of the app: a claim lost in the crash made no second
    assert sorted(apps) == pooling.instance_rows()
    if owner == APP:
        assert apps == [pooled]  # adopted, not replaced
    RESULTS.setdefault("claim_steps", {"crashes": 0, "passed": []})
    RESULTS["claim_steps"]["crashes"] += 1
    RESULTS["claim_steps"]["passed"].append(step)


class Traffic:
    """Clients sending requests in a loop; each outcome counted. `lost`: accepted, then
    neither a response nor a reset within HANG_S."""

    def __init__(self, port: int, host: str, clients: int = 4):
        self.port, self.host = port, host
        self.counts = {"sent": 0, "responses": 0, "ok": 0, "reset": 0, "refused": 0, "lost": 0}
        self.statuses: dict[int, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(HANG_S + 10)

    def _count(self, kind: str, status: int | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if status is not None:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=HANG_S)
            except OSError:
                self._count("refused")  # serve is down: not accepted, nothing lost
                time.sleep(0.02)
                continue
            try:
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
                self._count("sent")
                response = http.client.HTTPResponse(sock)
                response.begin()
                response.read()
                self._count("responses", response.status)
                if response.status == 200:
                    self._count("ok")
            except socket.timeout:
                self._count("lost")
            except (ConnectionError, http.client.HTTPException, OSError):
                self._count("reset")
            finally:
                sock.close()


def _wait_for(predicate, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _all_answer(srv: CrashServer, n: int = 10) -> None:
    """After a restart every request succeeds."""
    codes = [srv.request(APP)[0] for _ in range(n)]
    assert codes == [200] * n, codes


def test_requests_across_kill_9_of_serve_get_a_response_or_a_reset_never_a_hang(crashing):
    crashing.start()
    assert crashing.request(APP)[0] == 200
    with Traffic(crashing.port, APP) as traffic:
        for _ in range(KILLS):
            _wait_for(lambda: traffic.counts["ok"] >= 20, "no traffic got through")
            crashing.proc.send_signal(signal.SIGKILL)
            crashing.died_by_sigkill()
            crashing.restart()
            with traffic.lock:
                traffic.counts["ok"] = 0
    counts = dict(traffic.counts)
    counts.pop("ok")  # (per crash: traffic got through before the next)
    RESULTS["serve"] = {"crashes": KILLS, **counts, "statuses": traffic.statuses}
    assert counts["lost"] == 0, counts
    assert set(traffic.statuses) == {200}, traffic.statuses  # the instance runs on: no error status
    _all_answer(crashing)
    assert len(crashing.running()) == 1  # the one instance, adopted each time


def test_requests_across_kill_9_of_the_forkserver_get_a_response_never_a_hang(crashing, tmp_path):
    crashing.start()
    assert crashing.request(APP)[0] == 200
    sock = os.path.join(crashing.run_root, "forkserver.sock")

    def forkserver_pid() -> int:
        with Client(sock, timeout_s=5) as fs:
            return fs.request(fsp.Status()).pid

    with Traffic(crashing.port, APP) as traffic:
        for _ in range(KILLS):
            _wait_for(lambda: traffic.counts["ok"] >= 20, "no traffic got through")
            pid = forkserver_pid()
            os.kill(pid, signal.SIGKILL)

            def restarted() -> bool:
                try:
                    return forkserver_pid() != pid
                except (ForkServerGone, OSError):
                    return False

            _wait_for(restarted, "serve did not restart its fork-server")
            with traffic.lock:
                traffic.counts["ok"] = 0
    counts = dict(traffic.counts)
    counts.pop("ok")
    RESULTS["forkserver"] = {"crashes": KILLS, **counts, "statuses": traffic.statuses}
    assert counts["lost"] == 0 and counts["refused"] == 0 and counts["reset"] == 0, counts
    assert set(traffic.statuses) == {200}, traffic.statuses  # a running instance never needs it
    _all_answer(crashing)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    out = os.environ.get("FCRUN_CRASH_RESULTS")
    if out and RESULTS:
        os.makedirs(out, exist_ok=True)
        traffic = [r for r in RESULTS.values() if "sent" in r]
        total = {k: sum(r[k] for r in traffic) for k in ("crashes", "sent", "responses", "reset", "lost")}
        with open(os.path.join(out, "crash-serve.json"), "w") as f:
            json.dump({"hang_s": HANG_S, "traffic_total": total, **RESULTS,
                       "meaning": "lost: a request accepted before a crash that got neither a response nor a "
                                  "reset within hang_s; reset: accepted, then the connection was cut by the "
                                  "crash; refused: sent while serve was down (not accepted)"},
                      f, indent=2, sort_keys=True)
            f.write("\n")
