#!/usr/bin/env python3
"""Cold start of an apache-php app through `fcrun serve`, four ways, in one run (issue 6).

Each run is one GET / (a fresh connection) to a real `fcrun serve`, timed from sending it to
the last byte of phpinfo, for an app with no ready instance. Serve says in
X-Fcrun-Cold-Start-Path which way it found one; a run whose path is not the expected one
aborts the benchmark.

  (a) start: no pool (the app has an environment of its own, so no pooled instance fits it):
      the fork-server creates the container (overlay, cgroups, netns, veth, IP lease), serve
      waits until Apache accepts, then proxies. After each run the app is scaled to 0.
  (b) pool:  the fork-server's pool holds a pre-warmed, frozen apache-php instance; serve
      claims it (limits, the app's docroot mounted into its slot, labels, thaw) and proxies.
      After each run the app is scaled to 0 and the pool refilled before the next run.
  (b) is measured with the pool full: each claim thaws a frozen pooled instance.
  (c) thaw:  the app's own instance was frozen after --freeze-after (0.5 s) idle; the request
      thaws it. Before each run the benchmark waits until it is frozen again.
  (f) warm:  the floor under all of them: the app's own instance is running (never frozen);
      the same GET / on a new connection, through serve (issue 17 measures (b) and (c) over it).
  (e) raw thaw: the floor under (c), without fcrun serve: an apache-php container of the same
      spec, frozen with its cgroup freezer for 0.5 s, thawed by one cgroup write, then GET / on
      a new connection straight to its address.
  (d) runc:  the baseline. Mount a fresh overlay of the same image layer, `runc run -d` a
      bundle made from the same spec fcrun gives an instance, then poll GET / on the
      container's address until a whole phpinfo page arrives. Its network namespace and veth
      pair (a private /30) are made once, BEFORE timing, which favours runc.

All apps serve phpinfo() from a docroot (--page hello: a small script instead); limits cpu 1,
memory 512M. Rounds rotate the order of the paths; runs never overlap. Prints JSON: p50/p99 of
each, the ratios the issue sets targets for ((a)/(d) <= 1.0, (d)/(b) >= 20; (b) p50 <= 5 ms,
p99 <= 15 ms; (c) p50 <= 2 ms), the fork-server's own claim time, and the memory of frozen
instances (cgroup figures of the pooled and the thaw app's frozen instance).

Needs root, runc, and the apache-php image (`fcrun image build apache-php`); uses private
roots, cgroup parents, bridge (10.237.0.0/24), netns and veth (10.239.0.0/30), and only talks
to 127.0.0.1 and those addresses. Everything it makes is removed at the end.
Usage: bench/coldstart.py [--runs 30] [--warmup 2] [--page phpinfo|hello] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from fcrun import Paths
from fcrun import syscalls as sc
from fcrun.images import ImageStore
from fcrun.runtime.spec import encode_spec
from fcrun.runtime.options import RunOptions, spec_from_image
from fcrun.cmdb.models import Scale
from fcrun.serve.testing import ServeProcess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s helpers, also under `fcrun bench`
from benchlib import preflight, summary, work_dir_with_site  # noqa: E402

HOST = "cold.test"
FREEZE_AFTER_S = 0.5
CPU = 1.0
MEMORY = 512 << 20
SERVE_SUBNET = "10.237.0.0/24"
RUNC_HOST_IP, RUNC_CONTAINER_IP = "10.239.0.1", "10.239.0.2"
MS_NOSUID, MS_NODEV = 2, 4


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


# The app's page (--page): phpinfo() by default, the heaviest page PHP has built in; "hello", a
# small script, shows what of a cold path's cost over a warm request is the page's own.
PAGES = {
    "phpinfo": ("<?php phpinfo();\n", lambda body: b"PHP Version" in body and body.rstrip().endswith(b"</html>")),
    "hello": ("<?php echo 'hello from ', htmlspecialchars($_SERVER['HTTP_HOST']), ' at ', date('c'), \"\\n\";\n",
              lambda body: body.startswith(b"hello from ") and body.endswith(b"\n")),
}
page_is_whole = PAGES["phpinfo"][1]   # set by main() from --page


def is_whole_page(status: int, body: bytes) -> bool:
    """The apps' whole page (--page)."""
    return status == 200 and page_is_whole(body)


def get(host_ip: str, port: int, host: str, timeout: float) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(host_ip, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        r = conn.getresponse()
        body = r.read()
        return r.status, dict(r.getheaders()), body
    finally:
        conn.close()


class RuncBaseline:
    """A runc bundle of the same image and spec, in a network namespace made once."""

    def __init__(self, work: str, image, tag: str):
        self.dir = os.path.join(work, "runc")
        self.state_root = os.path.join(self.dir, "state")
        self.bundle = os.path.join(self.dir, "bundle")
        self.merged = os.path.join(self.dir, "merged")
        for d in (self.state_root, self.bundle, self.merged):
            os.makedirs(d)
        self.layers = image.layers
        self.netns = f"fcrun-cold-{tag}"
        self.veth_host, self.veth_peer = f"fcr{tag}h"[:15], f"fcr{tag}c"[:15]
        self.cgroup = f"fcrun-cold-{tag}-runc"
        self.netns_made = self.veth_made = self.mounted = False
        self.ids: list[str] = []
        spec = spec_from_image(image, RunOptions(cpu=CPU, memory_bytes=MEMORY, network="bridge"), name="runc-cold")
        config = json.loads(encode_spec(spec))
        config["root"] = {"path": self.merged, "readonly": False}
        config["linux"]["namespaces"] = [
            ns if ns["type"] != "network" else {"type": "network", "path": f"/run/netns/{self.netns}"}
            for ns in config["linux"]["namespaces"]
        ]
        config["linux"]["cgroupsPath"] = f"/{self.cgroup}/c"
        config.pop("annotations", None)
        self.config = config
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(config, f)

    def make_network(self) -> None:
        """Before any timing: netns, veth pair, a /30, both ends up."""
        if RUNC_HOST_IP in sh("ip", "-o", "-4", "addr").stdout or "10.239.0.0/30" in sh("ip", "route").stdout:
            raise SystemExit("10.239.0.0/30 is already in use on this host")
        sh("ip", "netns", "add", self.netns)
        self.netns_made = True
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_peer)
        self.veth_made = True
        sh("ip", "link", "set", self.veth_peer, "netns", self.netns)
        sh("ip", "addr", "add", f"{RUNC_HOST_IP}/30", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{RUNC_CONTAINER_IP}/30", "dev", self.veth_peer)
        sh("ip", "-n", self.netns, "link", "set", self.veth_peer, "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")

    def run_once(self, i: int, timeout_s: float) -> tuple[float, float]:
        """One timed cold start; returns (total, overlay mount, until accepting) in ms. Leaves it running."""
        cid = f"cold-{i}"
        upper, wd = os.path.join(self.dir, f"{i}", "upper"), os.path.join(self.dir, f"{i}", "work")
        t0 = time.perf_counter()
        os.makedirs(upper)
        os.makedirs(wd)
        options = f"lowerdir={':'.join(reversed(self.layers))},upperdir={upper},workdir={wd}"
        sc.mount(b"overlay", self.merged.encode(), b"overlay", 0, options.encode())
        self.mounted = True
        t_mount = time.perf_counter()
        self.ids.append(cid)
        # The container inherits runc's stdio: a pipe would never reach EOF, so a file.
        with open(os.path.join(self.dir, "runc.log"), "ab") as log:
            r = subprocess.run(["runc", "--root", self.state_root, "run", "-d", "--bundle", self.bundle, cid],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if r.returncode != 0:
            with open(os.path.join(self.dir, "runc.log"), "rb") as f:
                raise SystemExit(f"runc run failed: {f.read()[-1500:].decode(errors='replace')}")
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            conn = http.client.HTTPConnection(RUNC_CONTAINER_IP, 80, timeout=10)
            try:
                conn.connect()
                t_accepting = time.perf_counter()  # Apache accepts: what fcrun's header measures up to
                conn.request("GET", "/", headers={"Host": HOST})
                r = conn.getresponse()
                body = r.read()   # the image's own page (phpinfo), whatever --page says
                if r.status == 200 and PAGES["phpinfo"][1](body):
                    break
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"runc: Apache did not serve phpinfo within {timeout_s:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)
        t1 = time.perf_counter()
        return (t1 - t0) * 1000, (t_mount - t0) * 1000, (t_accepting - t0) * 1000

    def remove(self, i: int) -> None:
        for cid in list(self.ids):
            sh("runc", "--root", self.state_root, "delete", "-f", cid, check=False)
            self.ids.remove(cid)
        if self.mounted:
            for _ in range(50):
                try:
                    sc.umount2(self.merged.encode())
                    self.mounted = False
                    break
                except OSError:
                    time.sleep(0.05)
        shutil.rmtree(os.path.join(self.dir, f"{i}"), ignore_errors=True)

    def cleanup(self) -> None:
        if os.path.isdir(self.state_root):
            for cid in os.listdir(self.state_root):
                sh("runc", "--root", self.state_root, "delete", "-f", cid, check=False)
        self.ids.clear()
        if self.mounted:
            try:
                sc.umount2(self.merged.encode(), 2)  # MNT_DETACH
            except OSError as exc:
                print(f"coldstart: umount {self.merged}: {exc}", file=sys.stderr)
        if self.veth_made:
            sh("ip", "link", "del", self.veth_host, check=False)
        if self.netns_made:
            sh("ip", "netns", "del", self.netns, check=False)
        with open("/proc/self/mountinfo") as f:
            roots = {line.split()[4] for line in f if " - cgroup" in line}
        for root in roots:
            path = os.path.join(root, self.cgroup)
            if os.path.isdir(path):
                for sub in os.listdir(path):
                    if os.path.isdir(os.path.join(path, sub)):
                        try:
                            os.rmdir(os.path.join(path, sub))
                        except OSError:
                            pass
                try:
                    os.rmdir(path)
                except OSError as exc:
                    print(f"coldstart: rmdir {path}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (page cache, bridge, ...)")
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one cold start may take")
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    parser.add_argument("--page", choices=sorted(PAGES), default="phpinfo",
                        help="what the apps serve (default phpinfo; hello: a small script)")
    args = parser.parse_args(argv)
    global page_is_whole
    script, page_is_whole = PAGES[args.page]
    if code := preflight("bench/coldstart.py", ("runc",)):
        return code
    store = ImageStore(Paths(data_root=args.image_root, run_root="/nonexistent"))
    image = store.get("apache-php")

    tag = str(os.getpid())
    work, site = work_dir_with_site("fcrun-cold-", script)
    serve = ServeProcess(work, args.image_root, cgroup_parent=f"fcrun-cold-{tag}", bridge=f"fcc{tag}"[:15],
                         subnet=SERVE_SUBNET, extra_config="[forkserver]\npool_size = 1\n")
    runc = RuncBaseline(work, image, tag)
    times: dict[str, list[float]] = {"start": [], "pool": [], "thaw": [], "runc": [], "raw_thaw": [], "warm": []}
    header_ms: dict[str, list[float]] = {"start": [], "pool": [], "thaw": []}
    claim_ms: list[float] = []
    forkserver_claim_ms: list[float] = []
    pooled_memory: list[int] = []
    frozen_memory: list[int] = []
    t_begin = time.monotonic()
    common = ["--image", "apache-php", "--cpu", str(CPU), "--memory", f"{MEMORY >> 20}M", "--docroot", site]
    try:
        serve.cli("app", "add", "start.test", *common, "--env", "FCRUN_BENCH=start", "--idle-timeout", "600s")
        serve.cli("app", "add", "pool.test", *common, "--idle-timeout", "600s")
        serve.cli("app", "add", "thaw.test", *common, "--env", "FCRUN_BENCH=thaw", "--idle-timeout", "600s",
                  "--freeze-after", f"{FREEZE_AFTER_S}s")
        serve.cli("app", "add", "warm.test", *common, "--env", "FCRUN_BENCH=warm", "--idle-timeout", "600s",
                  "--freeze-after", "off")
        serve.start()
        admin = serve.admin()
        runc.make_network()
        status, _, _ = get("127.0.0.1", serve.port, "thaw.test", timeout=args.timeout)  # its first instance
        if status != 200:
            raise SystemExit(f"thaw.test: GET / gave {status}")
        status, _, _ = get("127.0.0.1", serve.port, "warm.test", timeout=args.timeout)
        if status != 200:
            raise SystemExit(f"warm.test: GET / gave {status}")
        raw = RawThaw(serve.runtime, image, site, timeout=args.timeout)

        def timed(host: str, path: str | None, record: bool) -> None:
            """One GET /; ``path`` is the cold-start path serve must report (None: none, warm)."""
            t0 = time.perf_counter()
            status, headers, body = get("127.0.0.1", serve.port, host, timeout=args.timeout)
            elapsed = (time.perf_counter() - t0) * 1000
            if not is_whole_page(status, body):
                raise SystemExit(f"{host}: GET / gave {status}: {body[:300]!r}")
            got = headers.get("X-Fcrun-Cold-Start-Path")
            if got != path:
                raise SystemExit(f"{host}: served by path {got!r}, expected {path!r} (headers {headers})")
            if record and path is None:
                times["warm"].append(elapsed)
            elif record:
                times[path].append(elapsed)
                header_ms[path].append(float(headers["X-Fcrun-Cold-Start"]))

        def scale_to_zero(app: str) -> None:
            admin.scale(app, Scale(instances=0))
            wait_until(lambda: admin.stats(app)[app].instances.total == 0, f"{app} has no instance")

        def run_start(i: int, record: bool) -> None:
            timed("start.test", "start", record)
            scale_to_zero("start.test")

        def run_pool(i: int, record: bool) -> None:
            status = serve.wait_pool_ready()
            if record:
                pooled_memory.extend(status.images["apache-php"].memory_bytes)
            before = status.images["apache-php"].claimed
            timed("pool.test", "pool", record)
            events = [e for e in admin.events("pool.test") if e.kind == "start" and e.data.get("path") == "pool"]
            if record and events:
                claim_ms.append(events[-1].data["ms"])  # serve's side: request to the fork-server until claimed
                forkserver_claim_ms.append(events[-1].data["forkserver_ms"])  # the fork-server's own part
            scale_to_zero("pool.test")
            assert serve.pool_status().images["apache-php"].claimed == before + 1

        def run_thaw(i: int, record: bool) -> None:
            wait_until(lambda: admin.stats("thaw.test")["thaw.test"].instances.frozen == 1, "thaw.test frozen")
            if record:
                frozen_memory.append(admin.stats("thaw.test")["thaw.test"].frozen_memory_bytes)
            timed("thaw.test", "thaw", record)

        def run_runc(i: int, record: bool) -> None:
            try:
                total, _, _ = runc.run_once(i, args.timeout)
            finally:
                runc.remove(i)
            if record:
                times["runc"].append(total)

        def run_raw(i: int, record: bool) -> None:
            elapsed = raw.run_once()
            if record:
                times["raw_thaw"].append(elapsed)

        def run_warm(i: int, record: bool) -> None:
            timed("warm.test", None, record)

        order = [run_start, run_pool, run_thaw, run_runc, run_raw, run_warm]
        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            for run in order[i % len(order):] + order[:i % len(order)]:
                run(i, record)
    finally:
        with contextlib.suppress(Exception):
            raw.remove()
        serve.stop()
        left = serve.reap_leftovers()
        runc.cleanup()
        serve_ok = serve.exit_codes == [0]
        shutil.rmtree(work, ignore_errors=True)

    s = {k: summary(v, digits=1) for k, v in times.items()}
    out = {
        "benchmark": "cold start of apache-php through fcrun serve: GET / to the last byte of the page",
        "page": args.page,
        "runs": args.runs,
        "warmup": args.warmup,
        "limits": {"cpu": CPU, "memory_bytes": MEMORY},
        "a_start": s["start"],
        "b_pool": s["pool"],
        "c_thaw": s["thaw"],
        "d_runc": s["runc"],
        "e_raw_thaw": s["raw_thaw"],
        "f_warm": s["warm"],
        "over_warm_ms": {  # issue 17's goals: pool <= +1.0 p50 and <= +3 p99, thaw <= +0.3 p50
            "pool_p50": round(s["pool"]["median_ms"] - s["warm"]["median_ms"], 2),
            "pool_p99": round(s["pool"]["p99_ms"] - s["warm"]["p99_ms"], 2),
            "thaw_p50": round(s["thaw"]["median_ms"] - s["warm"]["median_ms"], 2),
            "thaw_p99": round(s["thaw"]["p99_ms"] - s["warm"]["p99_ms"], 2),
        },
        "ratios": {
            "a_over_d_median": round(s["start"]["median_ms"] / s["runc"]["median_ms"], 3),
            "d_over_b_median": round(s["runc"]["median_ms"] / s["pool"]["median_ms"], 1),
            "d_over_c_median": round(s["runc"]["median_ms"] / s["thaw"]["median_ms"], 1),
            "c_minus_e_median_ms": round(s["thaw"]["median_ms"] - s["raw_thaw"]["median_ms"], 2),
        },
        "targets": {
            "b_p50_le_5ms": s["pool"]["median_ms"] <= 5.0,
            "b_p99_le_15ms": s["pool"]["p99_ms"] <= 15.0,
            "c_p50_le_2ms": s["thaw"]["median_ms"] <= 2.0,
            "a_over_d_le_1": s["start"]["median_ms"] <= s["runc"]["median_ms"],
            "d_over_b_ge_20": s["runc"]["median_ms"] >= 20 * s["pool"]["median_ms"],
        },
        "serve_header_ms": {k: summary(v, digits=1) for k, v in header_ms.items() if v},
        "serve_claim_ms": summary(claim_ms, digits=1) if claim_ms else None,
        "forkserver_claim_ms": summary(forkserver_claim_ms, digits=2) if forkserver_claim_ms else None,
        "memory": {
            "pooled_frozen_instance_cgroup_bytes_median": int(statistics.median(pooled_memory)) if pooled_memory else None,
            "app_frozen_instance_cgroup_bytes_median": int(statistics.median(frozen_memory)) if frozen_memory else None,
            "note": "cgroup v1 memory.usage_in_bytes (v2 memory.current): the instance's own pages plus page cache "
                    "it was charged for; see bench/pool_density.py for host memory with hundreds of instances",
        },
        "notes": [
            "runc's network namespace, veth pair and addresses were made once, before timing; fcrun makes its "
            "network per start (path a), which favours runc",
            "(a) is forced off the pool by an app environment variable (pooled instances run the image's own "
            "environment); (b) is measured with the pool full, refilled between runs; (c) after the instance "
            f"was frozen for freeze-after {FREEZE_AFTER_S} s",
            "rounds rotate the order of the paths; runs never overlap",
        ],
        "left_after_stop": left,
        "serve_exit_ok": serve_ok,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round(time.monotonic() - t_begin, 1),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


class RawThaw:
    """(e): one apache-php container on serve's bridge (no app label: serve leaves it alone),
    frozen and thawed through its cgroup, asked directly."""

    def __init__(self, runtime, image, site: str, timeout: float):
        from fcrun.runtime.spec import Mount

        self.runtime, self.timeout, self.name = runtime, timeout, f"raw-thaw-{os.getpid()}"
        spec = spec_from_image(image, RunOptions(cpu=CPU, memory_bytes=MEMORY, network="bridge"), name=self.name)
        spec.mounts.append(Mount(destination="/var/www/html", source=site, options=["rbind", "nosuid", "nodev"]))
        self.ip = runtime.run(self.name, spec, image=image, detach=True).ip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if is_whole_page(*[x for i, x in enumerate(get(self.ip, 80, HOST, timeout=5)) if i != 1]):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("raw thaw: its Apache never served the page")
            time.sleep(0.05)
        self.cgroup = runtime.cgroup(self.name)

    def run_once(self) -> float:
        self.cgroup.freeze()
        time.sleep(FREEZE_AFTER_S)
        t0 = time.perf_counter()
        self.cgroup.thaw()
        status, _, body = get(self.ip, 80, HOST, timeout=self.timeout)
        elapsed = (time.perf_counter() - t0) * 1000
        if not is_whole_page(status, body):
            raise SystemExit(f"raw thaw: GET / gave {status}")
        return elapsed

    def remove(self) -> None:
        self.runtime.delete(self.name, force=True)


def wait_until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting until {what}")
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
