"""`fcrun bench ...`: the benchmarks in the source tree's bench/ directory, run from the CLI.

They are development tools: they live next to the code (bench/*.py, each also runnable on its
own), so this group needs a source checkout (an editable install) and says so otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import click

from fcrun.errors import NotFound

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name: str):
    path = os.path.join(BENCH_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise NotFound(f"benchmark {path} not found: `fcrun bench` runs from a source checkout of fcrun")
    spec = importlib.util.spec_from_file_location(f"fcrun_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _run(name: str, argv: list[str], image_root_option: str | None = None, image_root: str | None = None,
         as_json: bool = False) -> None:
    """bench/NAME.py's main(argv), plus the data root and --json when given; its exit status."""
    if image_root is not None:
        argv += [image_root_option, image_root]
    if as_json:
        argv.append("--json")
    code = _load(name).main(argv)
    if code:
        raise SystemExit(code)


@click.group()
def bench():
    """Benchmarks (from the source tree's bench/ directory)."""


@bench.command("paper")
@click.option("--mode", type=click.Choice(["scale-out", "scale-up", "reactive", "all"]), default="all",
              show_default=True, help="The action at request N/2 (reactive: none, the policy decides).")
@click.option("--requests", "-n", type=click.IntRange(min=2000), default=100_000, show_default=True,
              help="Requests per mode.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Requests in flight (default: bench/paper.py's).")
@click.option("--out", default=None, metavar="DIR", help="Where the JSON and the PNG go (default: bench/results).")
@click.option("--image-store", default=None, metavar="DIR", help="Data root holding the apache-php image.")
def paper(mode: str, requests: int, concurrency: int | None, out: str | None, image_store: str | None):
    """The talk's experiment: an apache-php app at 0.3 CPU under a fixed load, scaled out,
    up, or reactively at request N/2. Prints JSON (per-phase latency and throughput, failures,
    time to new capacity) and the path of a PNG plot of response time by request index."""
    argv = ["--mode", mode, "--requests", str(requests)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if out is not None:
        argv += ["--out", out]
    _run("paper", argv, "--image-store", image_store)


@bench.command("coldstart")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs of each path.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed rounds first.")
@click.option("--image-store", default=None, metavar="DIR", help="Data root holding the apache-php image.")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
def coldstart(runs: int, warmup: int, image_store: str | None, as_json: bool):
    """Cold start of an apache-php app through fcrun serve, four ways: (a) start from nothing,
    (b) claim from the fork-server's warm pool, (c) thaw from frozen, (d) runc run of the same
    rootfs. GET / to the last byte of phpinfo; p50/p99 of each and their ratios, as JSON."""
    _run("coldstart", ["--runs", str(runs), "--warmup", str(warmup)], "--image-root", image_store, as_json)


@bench.command("density")
@click.option("--instances", type=click.IntRange(min=2, max=1000), default=200, show_default=True,
              help="Pooled instances to make (and half as many claimed, served and frozen).")
@click.option("--warming", type=click.IntRange(min=1, max=16), default=4, show_default=True,
              help="Instances warming at once while the pool fills.")
@click.option("--image-store", default=None, metavar="DIR", help="Data root holding the apache-php image.")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
def density(instances: int, warming: int, image_store: str | None, as_json: bool):
    """Memory per pooled and per frozen apache-php instance, and how many fit in 24 GiB."""
    _run("pool_density", ["--instances", str(instances), "--warming", str(warming)], "--image-root", image_store,
         as_json)


@bench.command("oci-cli")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed cycles per runtime.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed cycles first.")
@click.option("--runtime", default=None, metavar="PATH",
              help="The runtime to compare with runc (default: fcrun-oci beside this Python, or on PATH).")
@click.option("--podman-runs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Rounds of `podman run --rm` per runtime (0: none; skipped without podman).")
@click.option("--without-mount", multiple=True, metavar="DEST",
              help="Leave the default spec's mount at DEST out of the bundle, for both runtimes (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
def oci_cli(runs: int, warmup: int, runtime: str | None, podman_runs: int, without_mount: tuple[str, ...],
            as_json: bool):
    """fcrun-oci against runc as an engine drives them: create + start + delete of /bin/true on
    the same bundle (each command's time too), and `podman run --rm` with each. Needs root, runc."""
    argv = ["--runs", str(runs), "--warmup", str(warmup), "--podman-runs", str(podman_runs)]
    if runtime is not None:
        argv += ["--runtime", runtime]
    for dest in without_mount:
        argv += ["--without-mount", dest]
    _run("oci_cli", argv, as_json=as_json)


@bench.command("cluster")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed cold starts per contender.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed rounds first.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="wrk runs per warm contender (alternating).")
@click.option("--duration", type=click.IntRange(min=1), default=8, show_default=True, help="Seconds per wrk run.")
@click.option("--connections", "-c", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads", "-t", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--node-netns", is_flag=True, help="The node (and nginx's node) in a network namespace of its own, "
              "reached over a veth, instead of on loopback.")
@click.option("--out", default=None, metavar="PATH", help="Where the JSON goes too (default: "
              "bench/results/cluster.json, with --node-netns cluster-netns.json; '-': nowhere).")
@click.option("--image-store", default=None, metavar="DIR", help="Data root holding the apache-php image.")
@click.option("--json", "as_json", is_flag=True, help="One line of JSON.")
def cluster(runs: int, warmup: int, rounds: int, duration: int, connections: int, threads: int, node_netns: bool,
            out: str | None, image_store: str | None, as_json: bool):
    """A front and a node (`serve --role front|node`) on one PostgreSQL against a single-host
    serve: cold start from the pool through the front (with and without a placement) vs the
    single host's, and warm throughput front -> node -> instance vs nginx -> nginx -> instance
    (wrk). Medians, p99 and ratios, as JSON. Needs root, PostgreSQL, wrk, nginx."""
    argv = ["--runs", str(runs), "--warmup", str(warmup), "--rounds", str(rounds), "--duration", str(duration),
            "--connections", str(connections), "--threads", str(threads)]
    if node_netns:
        argv.append("--node-netns")
    if out is not None:
        argv += ["--out", out]
    _run("cluster", argv, "--image-root", image_store, as_json)


__all__ = ["bench"]
