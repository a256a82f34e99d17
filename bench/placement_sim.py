#!/usr/bin/env python3
"""Placement simulation (issue 15): a day of synthetic bursty traffic over 1,000 nodes and 100,000
apps, with the real placement (fcrun.cluster.placement) and scaling policy (fcrun.serve.policy).

Pure Python on a simulated clock: no root, no network, no CMDB. It prints one JSON object:

  decision_time_us   wall time of every placement call (cold starts and scale-outs), p50/p99/max
  spread             max/mean node CPU use (used / capacity over up nodes), at the busiest
                     sample and over the day (samples every 5 simulated minutes); memory too
  refused            placements refused for lack of capacity (and scale-outs refused at max)
  cmdb               CMDB statements per cold start and per second, as the design issues them
                     (the statement list is in CMDB_STATEMENTS below)
  front_memory       RSS of a separate process holding what a front holds for --apps apps

Traffic model (synthetic, seeded):
- Nodes: a mix of sizes (SIZES), each with a system reservation and a pool of pre-started
  instances of one or two images (a claimed one is replaced after POOL_REFILL_S).
- Apps: 95 % quiet sites (lognormal, median QUIET_PER_DAY requests a day), 5 % busy ones
  (median BUSY_PER_S requests/s); CPU per request lognormal; three regions whose days are 8 h
  apart (diurnal rate x 0.25..1.75); 3 % of apps get one burst a day (a social-media spike of
  several requests/s for 5-60 min, on top of their rate).
- A quiet app is event-driven: its requests are a Poisson process (thinned for the diurnal
  rate); a request with no instance is a cold start (a placement); its instance stops after the
  app's idle_timeout_s without a request (App's default, 60 s).
- A busy or bursting app is sampled: every EVAL_HOT_S (or EVAL_CALM_S while it is calm: one
  instance at its base quota, under half of it used) its instances' figures (CPU used,
  throttling, in-flight requests by M/M/1 from the offered rate) go to `policy.decide`, and its
  decisions are applied: scale-up/down changes the quota (the node's CPU reserved), scale-out
  places a new instance through `place_scale_out` (it serves from the next sample: a start
  takes far less than EVAL_HOT_S), scale-in drains one. Where `decide` is
  known to return nothing (one instance at its base quota, not hot), it is not called:
  `shortcut_history` gives the same history, and the smoke test checks that against `decide`.
- 1 % of the nodes go down for an hour at 40 % of the run (their instances are lost; their apps
  come back through a cold start elsewhere), 1 % are cordoned for two hours.
- The cluster figures a front would hold are updated at once after every change (a real front
  sees its own claims at once and the others' within a heartbeat, 2 s).

Usage: bench/placement_sim.py [--apps 100000] [--nodes 1000] [--hours 24] [--seed 1]
                              [--memory-ratio 1.0] [--no-front-memory] [--json]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import os
import random
import subprocess
import sys
import time
from array import array

import msgspec

from fcrun.cluster.placement import Cluster, NodeFigures, Policy, place, place_scale_out, scale_up_fits
from fcrun.cmdb.models import App
from fcrun.serve.policy import AppMetrics, History, InstanceFigures, decide

MIB, GIB = 1 << 20, 1 << 30
# (CPUs, memory, share of the nodes, pooled instances: image -> slots)
SIZES = ((2, 4 * GIB, 0.2, {"apache-php": 1}), (4, 8 * GIB, 0.4, {"apache-php": 2, "nginx": 1}),
         (8, 16 * GIB, 0.3, {"apache-php": 2, "python-wsgi": 1}), (16, 32 * GIB, 0.1, {"apache-php": 3, "node": 1}))
SYSTEM_MEMORY = 512 * MIB  # each node's own share (kernel, serve, fork-server)
POOL_SLOT_MEMORY = 128 * MIB  # a pooled instance, before an app claims it
POOL_REFILL_S = 3.0
IMAGES = (("apache-php", 0.6), ("nginx", 0.15), ("python-wsgi", 0.15), ("node", 0.1))
QUIET_PER_DAY, QUIET_SIGMA = 6.0, 1.2
BUSY_SHARE, BUSY_PER_S, BUSY_SIGMA = 0.05, 2.0, 1.0
CPU_PER_REQUEST_S, CPU_SIGMA = 0.05, 0.6
BURST_SHARE, BURST_PER_S = 0.03, 8.0
DIURNAL_AMPLITUDE = 0.75
REGIONS = ((0.5, 0.0), (0.3, 8 * 3600.0), (0.2, 16 * 3600.0))  # (share of apps, offset of their day)
EVAL_HOT_S, EVAL_WARM_S, EVAL_CALM_S = 15.0, 90.0, 300.0
LOAD_PUSH_SHARE = 0.02  # a node's CPU use reaches the cluster view when it moved by this share of its capacity
SAMPLE_S = 300.0
DENSE_ABOVE = 2.0  # requests expected per idle timeout above which an app is sampled, not event-driven
FRONTS = 4  # for the CMDB's periodic reads
HEARTBEAT_S = 2.0

# What the design sends the CMDB (PostgreSQL), per action. A front holds the apps (refreshed on
# NOTIFY fcrun_apps) and the nodes' figures (one SELECT of the nodes table per heartbeat
# interval, not per request) in memory, so a Host lookup and a placement read nothing.
CMDB_STATEMENTS = {
    # 1. SELECT pg_advisory_xact_lock(ns, hashtext(app)); 2. INSERT the claim row (owner = the
    # chosen node) only below the app's max, and in the same statement (a data-modifying CTE)
    # the placement event with its reasons: one transaction on the request's path. 3. The
    # node, once the instance is ready: UPDATE its row (state, ip, port) with the start event in
    # the same CTE statement, off the path.
    "cold_start": 3,
    "scale_out": 3,  # the same three
    "refusal": 1,  # an event saying why no node could take it
    "stop": 1,  # DELETE the row with the stop event (CTE)
    "quota_change": 1,  # UPDATE the row's cpu with the scale-up/down event (CTE)
}

ARRIVAL, STOP, EVAL, BURST, REFILL, NODE_STATE, SAMPLE = range(7)


class SimNode:
    __slots__ = ("name", "state", "cpu_capacity", "memory_capacity_bytes", "cpu_reserved", "memory_reserved_bytes",
                 "cpu_used", "instances", "pool_slots", "pool_free", "held", "pushed_used")

    def __init__(self, name: str, cpu: float, memory: int, pool: dict[str, int]):
        self.name, self.state, self.cpu_capacity, self.memory_capacity_bytes = name, "up", float(cpu), memory
        self.pool_slots, self.pool_free = dict(pool), dict(pool)
        self.cpu_reserved, self.cpu_used, self.instances, self.pushed_used = 0.0, 0.0, 0, 0.0
        self.memory_reserved_bytes = SYSTEM_MEMORY + POOL_SLOT_MEMORY * sum(pool.values())
        self.held: set[SimInstance] = set()

    def figures(self) -> NodeFigures:
        return NodeFigures(name=self.name, state=self.state, cpu_capacity=self.cpu_capacity,  # type: ignore[arg-type]
                           memory_capacity_bytes=self.memory_capacity_bytes, cpu_reserved=self.cpu_reserved,
                           memory_reserved_bytes=self.memory_reserved_bytes, cpu_used=max(self.cpu_used, 0.0),
                           instances=self.instances, pooled=dict(self.pool_free))


class SimInstance:
    __slots__ = ("app", "node", "quota", "cpu_used", "started_s", "name")

    def __init__(self, app: "SimApp", node: SimNode, quota: float, now: float, name: str):
        self.app, self.node, self.quota, self.cpu_used, self.started_s, self.name = app, node, quota, 0.0, now, name


class SimApp:
    __slots__ = ("app", "base", "offset", "cpu_s", "burst", "dense", "epoch", "instances", "history", "serial")

    def __init__(self, app: App, base: float, offset: float, cpu_s: float, burst: tuple[float, float, float] | None):
        self.app, self.base, self.offset, self.cpu_s, self.burst = app, base, offset, cpu_s, burst
        self.dense, self.epoch, self.serial = False, 0, 0
        self.instances: list[SimInstance] = []
        self.history = History()

    def rate(self, t: float) -> float:
        """Requests per second at time t."""
        r = self.base * (1.0 + DIURNAL_AMPLITUDE * math.sin(2 * math.pi * (t - self.offset) / 86400.0))
        if self.burst is not None and self.burst[0] <= t < self.burst[1]:
            r += self.burst[2]
        return r

    def per_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.instances:
            counts[i.node.name] = counts.get(i.node.name, 0) + 1
        return counts


def shortcut_history(history: History) -> History:
    """What `decide` returns for one instance at its base quota that is neither saturated nor
    crowded: no decision, and the hot/calm runs ended (see policy.decide and _shedding)."""
    return History(last_up_s=history.last_up_s, last_down_s=history.last_down_s)


def instance_figures(inst: SimInstance, offered_cpu: float, offered_rate: float, cpu_s: float) -> InstanceFigures:
    """The monitor's figures for one instance offered `offered_cpu` CPUs of work (M/M/1 queue)."""
    rho = offered_cpu / inst.quota
    used = min(offered_cpu, inst.quota)
    throttled = 0.9 if rho >= 1.0 else 0.25 if rho >= 0.85 else 0.0
    inflight = rho / (1.0 - rho) if rho < 0.98 else 49.0 + 50.0 * (rho - 0.98)
    return InstanceFigures(name=inst.name, cpu_limit=inst.quota, cpu_used=used, throttled=throttled,
                           inflight=inflight, requests=int(offered_rate * EVAL_HOT_S), started_s=inst.started_s)


class Sim:
    def __init__(self, apps: int, nodes: int, hours: float, seed: int, policy: Policy, check: bool = False):
        self.rng = random.Random(seed)
        self.end_s = hours * 3600.0
        self.check = check
        self.events: list[tuple[float, int, int, object, int]] = []
        self.seq = 0
        self.nodes = [self._node(i) for i in range(nodes)]
        self.by_name = {n.name: n for n in self.nodes}
        self.cluster = Cluster((n.figures() for n in self.nodes), policy)
        self.apps = [self._app(i) for i in range(apps)]
        self.decision_ns = array("q")
        self.counts = {k: 0 for k in ("cold_starts", "cold_starts_pooled", "scale_outs", "scale_outs_local",
                                      "scale_ins", "quota_changes", "scale_ups_refused", "stops", "refused_no_capacity",
                                      "refused_at_max", "decide_calls", "decide_skipped", "lost_to_down_nodes",
                                      "events")}
        self.samples: list[dict] = []
        self.statements_per_sample: list[int] = []
        self._statements = 0

    # -- the world ---------------------------------------------------------------------------

    def _node(self, i: int) -> SimNode:
        r, acc = self.rng.random(), 0.0
        for cpu, memory, share, pool in SIZES:
            acc += share
            if r < acc:
                break
        return SimNode(f"node-{i:04d}", cpu, memory, pool)

    def _app(self, i: int) -> SimApp:
        rng = self.rng
        busy = rng.random() < BUSY_SHARE
        base = (BUSY_PER_S * rng.lognormvariate(0, BUSY_SIGMA) if busy
                else QUIET_PER_DAY / 86400.0 * rng.lognormvariate(0, QUIET_SIGMA))
        image = rng.choices([m for m, _ in IMAGES], [w for _, w in IMAGES])[0]
        cpu = rng.choice((0.25, 0.5, 0.5, 1.0))
        memory = rng.choice((256, 512, 512, 1024)) * MIB
        app = App(name=f"site-{i}.example", image=image, cpu=cpu, cpu_max=2 * cpu, memory_bytes=memory,
                  max_instances=rng.randint(2, 8) if busy else rng.randint(1, 3))
        offset = rng.choices([o for _, o in REGIONS], [w for w, _ in REGIONS])[0]
        burst = None
        if rng.random() < BURST_SHARE:
            start = rng.uniform(0, self.end_s)
            burst = (start, start + rng.uniform(300, 3600), BURST_PER_S * rng.lognormvariate(0, 0.8))
        sim = SimApp(app, base, offset, min(1.0, CPU_PER_REQUEST_S * rng.lognormvariate(0, CPU_SIGMA)), burst)
        if burst is not None:
            self._at(burst[0], BURST, sim)
        if self._dense_worthy(sim, 0.0):
            sim.dense = True
            self._at(rng.uniform(0, EVAL_HOT_S), EVAL, sim)
        else:
            self._next_arrival(sim, 0.0)
        return sim

    def _at(self, t: float, kind: int, obj: object, epoch: int = 0) -> None:
        if t <= self.end_s:
            self.seq += 1
            heapq.heappush(self.events, (t, self.seq, kind, obj, epoch))

    def _dense_worthy(self, a: SimApp, t: float) -> bool:
        return a.rate(t) * a.app.idle_timeout_s >= DENSE_ABOVE

    def _peak_rate(self, a: SimApp) -> float:
        return a.base * (1.0 + DIURNAL_AMPLITUDE)

    def _next_arrival(self, a: SimApp, t: float) -> None:
        """The next candidate request of an event-driven app (thinning: ARRIVAL accepts it)."""
        self._at(t + self.rng.expovariate(self._peak_rate(a)), ARRIVAL, a, a.epoch)

    def _busy_until(self, a: SimApp, t: float) -> tuple[float, float]:
        """From a request at t: (when the instance stops idle, the next candidate request after)."""
        peak, idle, rng = self._peak_rate(a), a.app.idle_timeout_s, self.rng
        last = cand = t
        while True:
            cand += rng.expovariate(peak)
            if cand - last > idle:
                return last + idle, cand
            if rng.random() * peak < a.rate(cand):
                last = cand

    # -- instances ---------------------------------------------------------------------------

    def _push(self, node: SimNode) -> None:
        node.pushed_used = node.cpu_used
        self.cluster.update(node.figures())
        if self.check:
            limit = node.memory_capacity_bytes * self.cluster.policy.memory_overcommit
            assert node.memory_reserved_bytes <= limit, f"{node.name} over its memory ratio"

    def _start(self, a: SimApp, node_name: str, pooled: bool, t: float) -> SimInstance:
        node = self.by_name[node_name]
        if self.check:
            assert node.state == "up", f"{a.app.name} placed on {node.name}, which is {node.state}"
            assert len(a.instances) < a.app.max_instances
        a.serial += 1
        inst = SimInstance(a, node, a.app.cpu, t, f"{a.app.name}-{a.serial}")
        a.instances.append(inst)
        node.held.add(inst)
        node.instances += 1
        node.cpu_reserved += inst.quota
        node.memory_reserved_bytes += a.app.memory_bytes
        if pooled:
            node.pool_free[a.app.image] -= 1
            self._at(t + POOL_REFILL_S, REFILL, (node, a.app.image))
        self._push(node)
        self._statements += CMDB_STATEMENTS["cold_start"]
        return inst

    def _stop(self, inst: SimInstance, push: bool = True) -> None:
        a, node = inst.app, inst.node
        a.instances.remove(inst)
        node.held.discard(inst)
        node.instances -= 1
        node.cpu_reserved -= inst.quota
        node.cpu_used -= inst.cpu_used
        node.memory_reserved_bytes -= a.app.memory_bytes
        self.counts["stops"] += 1
        self._statements += CMDB_STATEMENTS["stop"]
        if push:
            self._push(node)

    def _load(self, inst: SimInstance, cpu_used: float) -> None:
        """A new CPU use of one instance; the cluster view hears of it when it matters (as the
        node's heartbeat would tell it within 2 s)."""
        node = inst.node
        node.cpu_used += cpu_used - inst.cpu_used
        inst.cpu_used = cpu_used
        if abs(node.cpu_used - node.pushed_used) > LOAD_PUSH_SHARE * node.cpu_capacity:
            self._push(node)

    def _timed(self, fn, *args):
        start = time.perf_counter_ns()
        decision = fn(self.cluster, *args)
        self.decision_ns.append(time.perf_counter_ns() - start)
        return decision

    def _cold_start(self, a: SimApp, t: float) -> bool:
        decision = self._timed(place, a.app, {})
        if decision.node is None:
            self.counts["refused_no_capacity"] += 1
            self._statements += CMDB_STATEMENTS["refusal"]
            return False
        self.counts["cold_starts"] += 1
        self.counts["cold_starts_pooled"] += decision.pooled
        self._start(a, decision.node, decision.pooled, t)
        return True

    # -- events ------------------------------------------------------------------------------

    def _arrival(self, a: SimApp, t: float) -> None:
        if self.rng.random() * self._peak_rate(a) >= a.rate(t):
            self._next_arrival(a, t)  # thinned away: no request at t
            return
        if self._dense_worthy(a, t):
            a.dense, a.epoch = True, a.epoch + 1
            self._at(t, EVAL, a, a.epoch)
            return
        if a.instances or not self._cold_start(a, t):
            self._next_arrival(a, t)
            return
        a.instances[0].cpu_used = 0.0
        self._load(a.instances[0], min(a.rate(t) * a.cpu_s, a.app.cpu))
        stop_s, cand = self._busy_until(a, t)
        a.epoch += 1
        self._at(stop_s, STOP, a, a.epoch)
        self._at(cand, ARRIVAL, a, a.epoch)

    def _eval(self, a: SimApp, t: float) -> None:
        rate = a.rate(t)
        bursting = a.burst is not None and a.burst[0] <= t < a.burst[1]
        if not a.instances:
            if rate * a.app.idle_timeout_s < 1.0 and not bursting:
                return self._to_event_driven(a, t)
            self._cold_start(a, t)
            return self._at(t + EVAL_HOT_S, EVAL, a, a.epoch)
        offered = rate * a.cpu_s
        n = len(a.instances)
        figures = [instance_figures(i, offered / n, rate / n, a.cpu_s) for i in a.instances]
        for inst, f in zip(a.instances, figures):
            self._load(inst, f.cpu_used)
        at_base = n == 1 and a.instances[0].quota == a.app.cpu
        hot = any(f.throttled >= 0.2 and f.cpu_used >= 0.85 * f.cpu_limit and f.inflight >= 0.5 for f in figures) \
            or sum(f.inflight for f in figures) / n > a.app.target_concurrency
        if at_base and not hot:
            self.counts["decide_skipped"] += 1
            a.history = shortcut_history(a.history)
            if rate * a.app.idle_timeout_s < 1.0 and not bursting:
                return self._to_event_driven(a, t)
        else:
            self.counts["decide_calls"] += 1
            plan = decide(AppMetrics(app=a.app, instances=tuple(figures), history=a.history), t)
            a.history = plan.history
            for d in plan.decisions:
                self._apply(a, d, t)
        # Sampled as often as something may change: the monitor samples every 250 ms, but a load
        # that neither is hot nor could become hot within a minute changes nothing in `decide`.
        if hot or bursting:
            every = EVAL_HOT_S
        elif not at_base or offered >= 0.5 * a.app.cpu:
            every = EVAL_WARM_S
        else:
            every = EVAL_CALM_S
        self._at(t + every, EVAL, a, a.epoch)

    def _apply(self, a: SimApp, d, t: float) -> None:
        if d.action == "scale-out":
            home = a.instances[0].node.name
            decision = self._timed(place_scale_out, a.app, a.per_node(), home)
            if decision.node is None:
                key = "refused_at_max" if len(a.instances) >= a.app.max_instances else "refused_no_capacity"
                self.counts[key] += 1
                self._statements += CMDB_STATEMENTS["refusal"] if key == "refused_no_capacity" else 0
                return
            self.counts["scale_outs"] += 1
            self.counts["scale_outs_local"] += decision.node == home
            self._start(a, decision.node, decision.pooled, t)
        elif d.action == "scale-in":
            self.counts["scale_ins"] += 1
            victim = next(i for i in a.instances if i.name == d.instance)
            self._stop(victim)
        else:  # scale-up / scale-down: the quota, bounded by the node's CPU ratio
            inst = next(i for i in a.instances if i.name == d.instance)
            node = inst.node
            if d.cpu > inst.quota and not scale_up_fits(node.figures(), d.cpu - inst.quota, self.cluster.policy):
                self.counts["scale_ups_refused"] += 1
                return
            node.cpu_reserved += d.cpu - inst.quota
            inst.quota = d.cpu
            self.counts["quota_changes"] += 1
            self._statements += CMDB_STATEMENTS["quota_change"]

    def _to_event_driven(self, a: SimApp, t: float) -> None:
        a.dense, a.epoch = False, a.epoch + 1
        if a.instances:
            stop_s, cand = self._busy_until(a, t)
            self._at(stop_s, STOP, a, a.epoch)
            self._at(cand, ARRIVAL, a, a.epoch)
        else:
            self._next_arrival(a, t)

    def _node_state(self, node: SimNode, state: str, t: float) -> None:
        node.state = state
        if state == "down":
            for inst in sorted(node.held, key=lambda i: i.name):  # a set: its order would vary run to run
                self.counts["lost_to_down_nodes"] += 1
                self._stop(inst, push=False)
                a = inst.app
                if not a.dense and not a.instances:  # its next request is a cold start elsewhere
                    a.epoch += 1
                    self._next_arrival(a, t)
        self._push(node)

    def _sample(self, t: float) -> None:
        up = [n for n in self.nodes if n.state == "up"]
        cpu = [max(n.cpu_used, 0.0) / n.cpu_capacity for n in up]
        mem = [n.memory_reserved_bytes / n.memory_capacity_bytes for n in up]
        mean_cpu, mean_mem = sum(cpu) / len(cpu), sum(mem) / len(mem)
        self.samples.append({
            "t_h": round(t / 3600, 2), "cpu_mean": mean_cpu, "cpu_max": max(cpu),
            "cpu_p99": sorted(cpu)[int(0.99 * (len(cpu) - 1))], "nodes_over_capacity": sum(c > 1.0 for c in cpu),
            "memory_mean": mean_mem, "memory_max": max(mem),
            "instances": sum(n.instances for n in self.nodes), "cpu_used": sum(max(n.cpu_used, 0.0) for n in up)})
        self.statements_per_sample.append(self._statements)
        self._statements = 0

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        rng = self.rng
        outage = 0.4 * self.end_s
        picks = rng.sample(self.nodes, max(1, len(self.nodes) // 50))
        for n in picks[:len(picks) // 2 or 1]:
            self._at(outage, NODE_STATE, (n, "down"))
            self._at(outage + 3600, NODE_STATE, (n, "up"))
        for n in picks[len(picks) // 2:]:
            self._at(outage, NODE_STATE, (n, "cordoned"))
            self._at(outage + 7200, NODE_STATE, (n, "up"))
        t = 0.0
        while t <= self.end_s:
            self._at(t, SAMPLE, None)
            t += SAMPLE_S
        events, counts = self.events, self.counts
        while events:
            t, _, kind, obj, epoch = heapq.heappop(events)
            counts["events"] += 1
            if kind == SAMPLE:
                self._sample(t)
            elif kind == REFILL:
                node, image = obj  # type: ignore[misc]
                node.pool_free[image] = min(node.pool_slots[image], node.pool_free[image] + 1)
                self._push(node)
            elif kind == NODE_STATE:
                self._node_state(*obj, t)  # type: ignore[misc]
            elif kind == BURST:
                a = obj
                if not a.dense:  # type: ignore[attr-defined]
                    a.dense, a.epoch = True, a.epoch + 1  # type: ignore[attr-defined]
                    self._at(t, EVAL, a, a.epoch)  # type: ignore[attr-defined]
            elif epoch != obj.epoch:  # type: ignore[attr-defined]
                continue  # superseded
            elif kind == ARRIVAL:
                self._arrival(obj, t)  # type: ignore[arg-type]
            elif kind == EVAL:
                self._eval(obj, t)  # type: ignore[arg-type]
            elif kind == STOP:
                for inst in list(obj.instances):  # type: ignore[attr-defined]
                    self._stop(inst)
                obj.history = History()  # type: ignore[attr-defined]  (its next ARRIVAL is queued)

    def report(self) -> dict:
        ns = sorted(self.decision_ns)

        def pct(q: float) -> float:
            return round(ns[min(len(ns) - 1, round(q / 100 * (len(ns) - 1)))] / 1000, 1) if ns else float("nan")

        busiest = max(self.samples, key=lambda s: s["cpu_used"])
        ratios = [s["cpu_max"] / s["cpu_mean"] for s in self.samples if s["cpu_mean"] > 0]
        p99_ratios = [s["cpu_p99"] / s["cpu_mean"] for s in self.samples if s["cpu_mean"] > 0]
        mem_ratios = [s["memory_max"] / s["memory_mean"] for s in self.samples]
        per_s = [n / SAMPLE_S for n in self.statements_per_sample]
        starts = self.counts["cold_starts"] + self.counts["scale_outs"]
        periodic = len(self.nodes) / HEARTBEAT_S + FRONTS / HEARTBEAT_S
        return {
            "decision_time_us": {"p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": pct(100), "n": len(ns)},
            "spread": {
                "busiest_sample": {"t_h": busiest["t_h"], "cpu_max_over_mean": round(busiest["cpu_max"] / busiest["cpu_mean"], 2),
                                   "cpu_p99_over_mean": round(busiest["cpu_p99"] / busiest["cpu_mean"], 2),
                                   "cpu_mean": round(busiest["cpu_mean"], 3), "cpu_max": round(busiest["cpu_max"], 3),
                                   "memory_mean": round(busiest["memory_mean"], 3), "memory_max": round(busiest["memory_max"], 3),
                                   "instances": busiest["instances"]},
                "day": {"cpu_max_over_mean_median": round(sorted(ratios)[len(ratios) // 2], 2),
                        "cpu_max_over_mean_worst": round(max(ratios), 2),
                        "cpu_p99_over_mean_median": round(sorted(p99_ratios)[len(p99_ratios) // 2], 2),
                        "samples_with_a_node_over_capacity": sum(s["nodes_over_capacity"] > 0 for s in self.samples),
                        "memory_max_over_mean_median": round(sorted(mem_ratios)[len(mem_ratios) // 2], 2),
                        "memory_max_over_mean_worst": round(max(mem_ratios), 2)},
            },
            "refused": {"no_capacity": self.counts["refused_no_capacity"], "scale_out_at_max": self.counts["refused_at_max"]},
            "counts": self.counts,
            "cmdb": {"statements_per_cold_start": CMDB_STATEMENTS["cold_start"], "statement_list": CMDB_STATEMENTS,
                     "placements": starts,
                     "per_s_request_driven_mean": round(sum(per_s) / len(per_s), 1),
                     "per_s_request_driven_peak_5min": round(max(per_s), 1),
                     "per_s_periodic": round(periodic, 1),
                     "periodic": f"heartbeats of {len(self.nodes)} nodes every {HEARTBEAT_S:g} s and a read of the "
                                 f"nodes table by each of {FRONTS} fronts as often"},
        }


def front_memory(apps: int, nodes: int) -> dict:
    """Run in a fresh interpreter: what a front holds for `apps` apps and `nodes` nodes, its RSS."""
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    base = rss_kib()
    rng = random.Random(1)
    cluster = Cluster(NodeFigures(name=f"node-{i:04d}", cpu_capacity=8.0, memory_capacity_bytes=16 * GIB,
                                  pooled={"apache-php": 2}) for i in range(nodes))
    node_names = sorted(cluster.nodes)
    hosts: dict[str, App] = {}
    routes: dict[str, RouteEntry] = {}
    for i in range(apps):
        app = App(name=f"site-{i}.example", hostnames=[f"www.site-{i}.example"], image="apache-php",
                  env=["APP_ENV=production", f"SITE_ID={i}"], docroot=f"/srv/sites/site-{i}",
                  cpu=0.5, memory_bytes=512 * MIB, max_instances=2, created_at=1.7e9 + i, updated_at=1.7e9 + i)
        for host in app.all_hostnames:
            hosts[host] = app
        routes[app.name] = RouteEntry(nodes=(node_names[rng.randrange(nodes)],), generation=1, checked_at=1.7e9)
    gc.collect()
    return {"apps": apps, "hostnames": len(hosts), "route_entries": len(routes), "nodes": len(cluster),
            "rss_mib": round(rss_kib() / 1024, 1), "rss_before_mib": round(base / 1024, 1),
            "added_mib": round((rss_kib() - base) / 1024, 1)}


class RouteEntry(msgspec.Struct, frozen=True, gc=False):
    """What a front would cache per app: the nodes running a ready instance of it (the assumed
    shape of the front's cache, for the memory figure; the front itself is not built yet)."""

    nodes: tuple[str, ...]
    generation: int
    checked_at: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory-ratio", type=float, default=1.0, help="memory overcommit ratio")
    parser.add_argument("--no-front-memory", action="store_true", help="skip the front memory subprocess")
    parser.add_argument("--front-memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the JSON on one line")
    args = parser.parse_args(argv)
    if args.front_memory_child:
        print(json.dumps(front_memory(args.apps, args.nodes)))
        return 0
    started = time.monotonic()
    sim = Sim(args.apps, args.nodes, args.hours, args.seed, Policy(memory_overcommit=args.memory_ratio))
    gc.collect()
    gc.freeze()  # what was built stays: collections then scan only what the run makes (a front would do so)
    built = time.monotonic()
    sim.run()
    result = {"bench": "placement_sim", "apps": args.apps, "nodes": args.nodes, "hours": args.hours,
              "seed": args.seed, "policy": msgspec.to_builtins(sim.cluster.policy), **sim.report(),
              "wall_s": {"build": round(built - started, 1), "run": round(time.monotonic() - built, 1)}}
    if not args.no_front_memory:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--front-memory-child",
                                "--apps", str(args.apps), "--nodes", str(args.nodes)],
                               capture_output=True, text=True, check=True)
        result["front_memory"] = json.loads(child.stdout)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
