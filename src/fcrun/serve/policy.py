"""The scaling policy: a pure function of an app's recent figures and the time -> decisions.

No I/O, no clock and no state of its own. What it must remember between calls (when it last
scaled, since when the app has looked hot or calm) comes in as `History` and goes out, updated,
in the `Plan`; the manager keeps it per app. Tests drive it over synthetic load traces with a
plain number for `now` (tests/unit/test_policy.py).

Signals, per routable instance, over the last sample interval (see monitor.py):

  saturated  throttled in >= `throttled_high` of its CFS periods *and* using >= `busy_high`
             of its quota, with requests in flight (CPU burnt with no request is not load).
             "Of its quota" counts whole CFS periods (`quota_used`): a 250 ms interval spans
             two or three 100 ms periods, so a saturated instance at 0.3 CPU reads 0.24 or
             0.36 CPU used, and an average over wall time alone would miss it half the time.
  crowded    the app's average in-flight requests per instance above its target_concurrency

Decisions, one family at a time:

  scale-up    a saturated instance below the app's ceiling (cpu_max) gets its quota times
              `up_factor`, capped at the ceiling
  scale-out   every routable instance is at its ceiling and still saturated, or the app is
              crowded: one more instance, up to max_instances, one start at a time. Crowding
              is a signal of its own: a crowded app gets its instance in the same decision as
              any scale-up (more quota alone would leave the requests as crowded; waiting for
              the up cooldown first would leave them queued for cooldown_up_s)
  scale-in    the app's load would fit in the instances left with room to spare: drain one,
              keeping max(min_instances, 1) (the last one still goes by idle-timeout)
  scale-down  an instance above the app's cpu whose load fits in a smaller quota: quota
              divided by `up_factor`, never below the app's cpu

Cooldowns, separate per family so that decisions never flap:

  up/out     the hot signal must hold for `sustain_up_s` (one noisy sample does not act) and
             the last scale-up or scale-out must be cooldown_up_s ago. A burst right after a
             scale-down is met at once: shedding does not delay adding.
  down/in    the app must have been calm without a break for cooldown_down_s, counted from
             the later of the calm's start and the last scale-down/in. A hot moment restarts
             the count, so an oscillating load keeps what it was given until it really falls.

Between "saturated" (>= 85 % of quota used) and "fits" (load <= 60 % of the smaller capacity)
lies a band where nothing happens: a quota that was just lowered is not raised again by the
load that fit into it.

A noisy neighbour (another process taking the host's CPU) slows an instance without
throttling it; more quota would not help, so that is not "saturated" and the policy holds.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ..cmdb.models import App

Action = Literal["scale-up", "scale-down", "scale-out", "scale-in"]
_EPSILON = 1e-6


class Tuning(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds of the policy (the per-app settings come from the App itself)."""

    throttled_high: float = 0.2  # share of CFS periods throttled
    busy_high: float = 0.85  # CPU used / quota
    load_min_inflight: float = 0.5  # average in-flight requests that count as "under load"
    up_factor: float = 2.0  # scale-up multiplies the quota by this; scale-down divides
    fit_share: float = 0.6  # shed capacity only when the load fits in this share of what is left
    sustain_up_s: float = 0.2  # a hot signal must hold this long (two samples at 250 ms)


class InstanceFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One routable instance over the last sample interval (what monitor.py computes)."""

    name: str
    cpu_limit: float  # its quota now, in CPUs
    cpu_used: float = 0.0  # CPUs used on average over the interval
    # CPU used as a share of the quota of the whole CFS periods the interval spans (>= 1.0 when
    # saturated, wherever the interval falls on period boundaries); None: cpu_used / cpu_limit.
    quota_used: float | None = None
    throttled: float = 0.0  # share of its CFS periods in which it was throttled, 0..1
    inflight: float = 0.0  # in-flight requests, time-averaged over the interval
    requests: int = 0  # requests completed in the interval
    latency_ms: float | None = None  # their mean response time
    memory_bytes: int = 0
    cpu_pressure: float | None = None  # PSI "some" avg10 (%), where the kernel has it
    started_s: float = 0.0  # when it became ready (same clock as `now`), to break ties


class History(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy remembers between calls (the manager keeps it per app)."""

    last_up_s: float | None = None  # last scale-up or scale-out (forced ones count too)
    last_down_s: float | None = None  # last scale-down or scale-in
    hot_since_s: float | None = None  # start of the current run of hot samples
    calm_since_s: float | None = None  # start of the current run of calm samples


class AppMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """The policy's input for one app."""

    app: App
    instances: tuple[InstanceFigures, ...] = ()  # routable ones
    starting: int = 0  # instances being started now
    history: History = History()


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    action: Action
    reason: str  # a sentence with the figures, for the event log
    instance: str | None = None  # scale-up/down: the instance; scale-in: the one to drain
    cpu: float | None = None  # scale-up/down: its new quota
    figures: dict[str, float] = {}


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    decisions: tuple[Decision, ...] = ()
    history: History = History()


def decide(metrics: AppMetrics, now: float, tuning: Tuning = Tuning()) -> Plan:
    """What to change about one app now. Pure: same input, same output."""
    app, history = metrics.app, metrics.history
    instances = metrics.instances
    if not instances:
        # Nothing serves: starting on demand and stopping on idle are the manager's business.
        return Plan(history=msgspec.structs.replace(history, hot_since_s=None, calm_since_s=None))

    saturated = [i for i in instances if _saturated(i, tuning)]
    per_instance = sum(i.inflight for i in instances) / len(instances)
    crowded = per_instance > app.target_concurrency
    hot = bool(saturated) or crowded
    hot_since = (history.hot_since_s if history.hot_since_s is not None else now) if hot else None
    shed = None if hot else _shedding(metrics, tuning)
    calm_since = (history.calm_since_s if history.calm_since_s is not None else now) if shed else None
    history = msgspec.structs.replace(history, hot_since_s=hot_since, calm_since_s=calm_since)

    if hot:
        if now - hot_since < tuning.sustain_up_s - _EPSILON or not _cooled(history.last_up_s, app.cooldown_up_s, now):
            return Plan(history=history)
        decisions = _grow(metrics, saturated, crowded, per_instance, tuning)
        if decisions:
            history = msgspec.structs.replace(history, last_up_s=now, hot_since_s=None)
        return Plan(decisions=decisions, history=history)

    if shed:
        since = calm_since if history.last_down_s is None else max(calm_since, history.last_down_s)
        if now - since >= app.cooldown_down_s - _EPSILON:
            return Plan(decisions=shed, history=msgspec.structs.replace(history, last_down_s=now, calm_since_s=None))
    return Plan(history=history)


def _saturated(i: InstanceFigures, tuning: Tuning) -> bool:
    busy = i.quota_used if i.quota_used is not None else i.cpu_used / i.cpu_limit if i.cpu_limit > 0 else 0.0
    return i.throttled >= tuning.throttled_high and busy >= tuning.busy_high and i.inflight >= tuning.load_min_inflight


def _cooled(last: float | None, cooldown_s: float, now: float) -> bool:
    return last is None or now - last >= cooldown_s - _EPSILON


def _grow(metrics: AppMetrics, saturated: list[InstanceFigures], crowded: bool, per_instance: float,
          tuning: Tuning) -> tuple[Decision, ...]:
    app = metrics.app
    ceiling = app.cpu_ceiling
    ups = []
    for i in saturated:
        if i.cpu_limit < ceiling - _EPSILON:
            cpu = round(min(ceiling, i.cpu_limit * tuning.up_factor), 4)
            ups.append(Decision(
                action="scale-up", instance=i.name, cpu=cpu, figures=_figures(i),
                reason=(f"{i.name} throttled in {i.throttled:.0%} of periods, using {i.cpu_used:.2f} of "
                        f"{i.cpu_limit:g} CPU with {i.inflight:.1f} requests in flight: "
                        f"cpu {i.cpu_limit:g} -> {cpu:g}"),
            ))
    # Another instance when the app is crowded (whatever quota is being added), or when every
    # saturated instance is at the ceiling and so are the others.
    at_ceiling = all(i.cpu_limit >= ceiling - _EPSILON for i in metrics.instances)
    if not (crowded or (saturated and at_ceiling)):
        return tuple(ups)
    count = len(metrics.instances) + metrics.starting
    if metrics.starting or count >= app.max_instances:
        return tuple(ups)
    if crowded:
        why = (f"{per_instance:.1f} requests in flight per instance, above the target of "
               f"{app.target_concurrency}")
    else:
        why = (f"{len(saturated)} of {len(metrics.instances)} instances at the cpu ceiling {ceiling:g} "
               f"and still throttled ({max(i.throttled for i in saturated):.0%} of periods)")
    figures = {"instances": float(len(metrics.instances)), "inflight_per_instance": round(per_instance, 2),
               "cpu_used": round(sum(i.cpu_used for i in metrics.instances), 3)}
    return (*ups, Decision(action="scale-out", figures=figures,
                           reason=f"{why}: {len(metrics.instances)} -> {count + 1} instances"))


def _shedding(metrics: AppMetrics, tuning: Tuning) -> tuple[Decision, ...]:
    """What could go while the load still fits: one instance, else quota; () if nothing."""
    app, instances = metrics.app, metrics.instances
    used = sum(i.cpu_used for i in instances)
    inflight = sum(i.inflight for i in instances)
    keep = max(app.min_instances, 1)
    if len(instances) > keep and not metrics.starting:
        # Drain the least busy instance; among equals the newest (it has the coldest caches).
        victim = min(instances, key=lambda i: (i.inflight, -i.started_s))
        rest = [i for i in instances if i is not victim]
        capacity = sum(i.cpu_limit for i in rest)
        if used <= tuning.fit_share * capacity and inflight <= tuning.fit_share * app.target_concurrency * len(rest):
            figures = {"instances": float(len(instances)), "cpu_used": round(used, 3),
                       "cpu_left": round(capacity, 3), "inflight": round(inflight, 2)}
            return (Decision(
                action="scale-in", instance=victim.name, figures=figures,
                reason=(f"load fits in {len(rest)} instance{'s' if len(rest) > 1 else ''} (using {used:.2f} of "
                        f"{capacity:g} CPU left, {inflight:.1f} in flight): {len(instances)} -> {len(rest)}, "
                        f"draining {victim.name}"),
            ),)
    downs = []
    for i in instances:
        if i.cpu_limit <= app.cpu + _EPSILON:
            continue
        cpu = round(max(app.cpu, i.cpu_limit / tuning.up_factor), 4)
        if i.cpu_used <= tuning.fit_share * cpu and i.throttled < tuning.throttled_high:
            downs.append(Decision(
                action="scale-down", instance=i.name, cpu=cpu, figures=_figures(i),
                reason=f"{i.name} uses {i.cpu_used:.2f} of {i.cpu_limit:g} CPU: cpu {i.cpu_limit:g} -> {cpu:g}",
            ))
    return tuple(downs)


def _figures(i: InstanceFigures) -> dict[str, float]:
    out = {"cpu_limit": i.cpu_limit, "cpu_used": round(i.cpu_used, 3), "throttled": round(i.throttled, 3),
           "inflight": round(i.inflight, 2), "requests": float(i.requests)}
    if i.quota_used is not None:
        out["quota_used"] = round(i.quota_used, 3)
    if i.latency_ms is not None:
        out["latency_ms"] = round(i.latency_ms, 1)
    if i.cpu_pressure is not None:
        out["cpu_pressure"] = i.cpu_pressure
    return out
