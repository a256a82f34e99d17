#!/usr/bin/env python3
"""A node's read of the cluster (cluster/node.py `NodeAgent._read`, four times a second): the
per-app reads it made before (the nodes, its placements, then each placed app's placements and
instances: 2 + 2 x apps statements) against `CMDB.apps_on` (the nodes, then 2 statements) and
against what it does now (`CMDB.apps_on`, the nodes through cluster/nodes_cache.py: read one
round in four, as a round is every 0.25 s and the nodes are re-read once a second), on a
private PostgreSQL (tests/pgserver.py, fsync on) in the same run, alternating. Prints one JSON
object: p50/p99 and mean ms per round for each, the ratios, statements per round.

    flock /tmp/fcrun-heavy.lock .venv/bin/python bench/node_follow.py [--apps-here 100] [--nodes 1000] [--rounds 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(HERE, "..", "tests"))

from benchlib import summary  # noqa: E402
from pgserver import PgServer, pg_bindir  # noqa: E402

from fcrun.cmdb.migrations import LATEST_VERSION  # noqa: E402
from fcrun.cmdb.models import App, Instance  # noqa: E402
from fcrun.cmdb.nodes import NodeBeat  # noqa: E402
from fcrun.cmdb.postgres import PostgresCMDB  # noqa: E402
from fcrun.cmdb.sql import Dump  # noqa: E402
from fcrun.cluster.node import FOLLOW_S  # noqa: E402
from fcrun.cluster.nodes_cache import NodesCache  # noqa: E402

NODE = "n0"


def per_app_read(db: PostgresCMDB) -> tuple:
    """What NodeAgent._read did before CMDB.apps_on."""
    nodes = db.list_nodes()
    mine = {r.app for r in db.list_placements(None, NODE)}
    placements = [r for app in sorted(mine) for r in db.list_placements(app)]
    instances = [i for app in sorted(mine) for i in db.list_instances(app)]
    return nodes, placements, instances


def apps_on_read(db: PostgresCMDB) -> tuple:
    """What NodeAgent._read did before the nodes were cached: the nodes every round."""
    return db.list_nodes(), db.apps_on(NODE)


class CachedRead:
    """What NodeAgent._read does now: the nodes through a NodesCache (a round every FOLLOW_S,
    so the table is read one round in four), its apps in two statements every round."""

    def __init__(self, db: PostgresCMDB):
        self.clock = 0.0
        self.nodes = NodesCache(db.list_nodes, clock=lambda: self.clock)

    def __call__(self, db: PostgresCMDB) -> tuple:
        self.clock += FOLLOW_S
        return self.nodes.read(), db.apps_on(NODE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps-here", type=int, default=100, help="apps placed on the node that reads")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    pg = PgServer(pg_bindir(), fsync=True).start()
    try:
        url = pg.new_database()
        now = time.time()
        apps = [f"site{i}.example" for i in range(args.apps_here * 10)]
        with PostgresCMDB(url) as db:
            db.import_dump(Dump(schema_version=LATEST_VERSION, apps=[App(name=a, image="apache-php") for a in apps],
                                instances=[Instance(id=f"{a}-1", app=a, container=f"{a}-1", state="ready",
                                                    started_at=now, owner=f"n{i % args.nodes}")
                                           for i, a in enumerate(apps)]))
            for n in range(args.nodes):
                db.node_beat(NodeBeat(name=f"n{n}", role="node", address=f"127.0.0.1:{20000 + n}",
                                      figures={"cpu_capacity": 8.0, "instances": 10}))
            for i, app in enumerate(apps):  # a tenth on the reading node, the rest elsewhere
                db.add_placement(app, NODE if i % 10 == 0 else f"n{1 + i % (args.nodes - 1)}")
            times: dict[str, list[float]] = {"per_app": [], "apps_on": [], "nodes_cached": []}
            cached = CachedRead(db)
            contenders = (("per_app", per_app_read), ("apps_on", apps_on_read), ("nodes_cached", cached))
            for i in range(args.rounds):
                for name, read in contenders[:: 1 if i % 2 else -1]:
                    t0 = time.perf_counter()
                    read(db)
                    times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        pg.stop()
    s = {k: {**summary(v, digits=2), "mean_ms": round(sum(v) / len(v), 2)} for k, v in times.items()}
    print(json.dumps({"benchmark": "a node's read of the cluster, per round", "nodes": args.nodes,
                      "apps_placed_on_the_node": args.apps_here, "rounds": args.rounds,
                      "per_app_reads": s["per_app"], "apps_on": s["apps_on"], "nodes_cached": s["nodes_cached"],
                      "statements_per_round": {"per_app_reads": 2 + 2 * args.apps_here, "apps_on": 3,
                                               "nodes_cached": 2.25},
                      "p50_ratio_apps_on_over_per_app": round(s["apps_on"]["median_ms"] / s["per_app"]["median_ms"], 3),
                      "mean_ratio_nodes_cached_over_apps_on": round(s["nodes_cached"]["mean_ms"] / s["apps_on"]["mean_ms"],
                                                                    3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
