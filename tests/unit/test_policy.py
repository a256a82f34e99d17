"""The scaling policy over synthetic load traces, with a fake clock: a spike, a slow ramp, an
oscillation that must not flap, a noisy neighbour, and the rules at the edges.

`Sim` stands in for the host: instances with a CPU quota share the offered load evenly (as
least-outstanding balancing does); an instance offered more than its quota uses its quota and
is throttled in most periods. Every 250 ms (the monitor's default interval) it turns its state
into the policy's input, calls `decide`, and applies the decisions: a quota change at once, a
new instance after a start delay, a drained one gone at once.
"""

from __future__ import annotations

import msgspec
import pytest

from fcrun.cmdb.models import App
from fcrun.serve.policy import AppMetrics, History, InstanceFigures, Tuning, decide

STEP_S = 0.25


def app(**kw) -> App:
    settings = dict(name="site.test", image="apache-php", cpu=0.3, cpu_max=0.6, min_instances=0, max_instances=2,
                    target_concurrency=10, cooldown_up_s=2.0, cooldown_down_s=10.0)
    settings.update(kw)
    return App(**settings)


class Sim:
    def __init__(self, app: App, load, start_delay_s: float = 0.5, instances: int = 1):
        self.app = app
        self.load = load  # t -> (CPUs the offered load would use, requests in flight in all)
        self.start_delay_s = start_delay_s
        self.limits = {f"i{n}": app.cpu for n in range(instances)}
        self.started = {name: 0.0 for name in self.limits}
        self.pending: list[float] = []  # when each start completes
        self.history = History()
        self.log: list[tuple[float, str, str | None, float | None]] = []  # (t, action, instance, cpu)
        self.reasons: list[str] = []
        self._next = instances

    def figures(self, t: float) -> tuple[InstanceFigures, ...]:
        demand, inflight = self.load(t)
        n = len(self.limits)
        out = []
        for name, limit in self.limits.items():
            share = demand / n
            throttled = 0.9 if share > limit else (0.05 if share > 0.8 * limit else 0.0)
            out.append(InstanceFigures(name=name, cpu_limit=limit, cpu_used=min(share, limit), throttled=throttled,
                                       inflight=inflight / n, requests=int(100 * min(share, limit)),
                                       started_s=self.started[name]))
        return tuple(out)

    def run(self, until_s: float, t0: float = 0.0) -> "Sim":
        t = t0
        while t <= until_s + 1e-9:
            for done in [p for p in self.pending if p <= t]:
                self.pending.remove(done)
                name = f"i{self._next}"
                self._next += 1
                self.limits[name] = self.app.cpu
                self.started[name] = t
            plan = decide(AppMetrics(app=self.app, instances=self.figures(t), starting=len(self.pending),
                                     history=self.history), t)
            self.history = plan.history
            for d in plan.decisions:
                self.log.append((round(t, 2), d.action, d.instance, d.cpu))
                self.reasons.append(d.reason)
                if d.action in ("scale-up", "scale-down"):
                    self.limits[d.instance] = d.cpu
                elif d.action == "scale-out":
                    self.pending.append(t + self.start_delay_s)
                elif d.action == "scale-in":
                    del self.limits[d.instance]
            t = round(t + STEP_S, 6)
        self.end_s = t
        return self

    def actions(self) -> list[str]:
        return [a for _, a, _, _ in self.log]


def test_spike_scales_up_within_a_second_then_out_after_the_cooldown():
    sim = Sim(app(), lambda t: (0.1, 1) if t < 5 else (2.0, 8)).run(30)
    assert sim.actions() == ["scale-up", "scale-out", "scale-up"]
    (t_up, _, inst, cpu), (t_out, *_), (t_up2, _, inst2, cpu2) = sim.log
    assert 5 < t_up <= 6 and (inst, cpu) == ("i0", 0.6)
    assert t_out - t_up >= 2.0 and t_out - t_up <= 2.5  # cooldown_up, then at once (still hot)
    assert t_up2 - t_out >= 2.0 and (inst2, cpu2) == ("i1", 0.6)
    assert sim.limits == {"i0": 0.6, "i1": 0.6}
    assert "throttled in 90% of periods" in sim.reasons[0] and "cpu 0.3 -> 0.6" in sim.reasons[0]
    assert "at the cpu ceiling 0.6" in sim.reasons[1] and "1 -> 2 instances" in sim.reasons[1]


def test_slow_ramp_adds_capacity_step_by_step_and_never_sheds_on_the_way():
    a = app(cpu=0.25, cpu_max=1.0, max_instances=3)
    sim = Sim(a, lambda t: (0.05 + 3.5 * t / 120, 4)).run(120)
    actions = sim.actions()
    assert "scale-down" not in actions and "scale-in" not in actions
    assert actions[:2] == ["scale-up", "scale-up"]  # 0.25 -> 0.5 -> 1.0: steps, not a jump
    assert [c for _, a_, i, c in sim.log if i == "i0"] == [0.5, 1.0]
    assert actions.count("scale-out") == 2 and len(sim.limits) == 3
    ups = [t for t, a_, _, _ in sim.log if a_ in ("scale-up", "scale-out")]
    # Each round of up-family decisions waits for the cooldown after the last one.
    rounds = sorted(set(ups))
    assert all(b - a_ >= a.cooldown_up_s for a_, b in zip(rounds, rounds[1:]))
    # Every scale-out came only once no instance had room left below the ceiling.
    for t, action, _, _ in sim.log:
        if action == "scale-out":
            assert all(sim_limit == 1.0 for sim_limit in _limits_before(sim, t).values())


def _limits_before(sim: Sim, t_out: float) -> dict[str, float]:
    limits: dict[str, float] = {"i0": sim.app.cpu}
    n = 1
    for t, action, inst, cpu in sim.log:
        if t >= t_out:
            break
        if action == "scale-up":
            limits[inst] = cpu
        elif action == "scale-out":
            limits[f"i{n}"] = sim.app.cpu
            n += 1
    return limits


def test_oscillating_load_does_not_flap_and_sheds_only_once_it_stays_low():
    def load(t):
        if t >= 60:
            return (0.02, 0.1)  # then it stays low
        return (1.5, 8) if int(t / 2) % 2 == 0 else (0.05, 0.5)  # 2 s high, 2 s low

    sim = Sim(app(), load).run(120)
    during = [a for t, a, _, _ in sim.log if t < 60]
    after = [(t, a) for t, a, _, _ in sim.log if t >= 60]
    # Capacity goes up while it oscillates, and is never taken away meanwhile.
    assert "scale-down" not in during and "scale-in" not in during
    assert during.count("scale-out") == 1 and len(during) <= 4
    # Once low for cooldown_down_s: one instance drained, then (another cooldown) its quota.
    assert [a for _, a in after] == ["scale-in", "scale-down"]
    (t_in, _), (t_down, _) = after
    # The last high half-period ended at 58 s; calm from then on for cooldown_down_s (10 s).
    assert 68 <= t_in <= 68.5 and t_down - t_in >= 10
    assert list(sim.limits.values()) == [0.3]
    # Direction changed exactly once over the whole run: up ... up, then down ... down.
    directions = ["up" if a in ("scale-up", "scale-out") else "down" for a in sim.actions()]
    assert sum(1 for x, y in zip(directions, directions[1:]) if x != y) == 1


def test_oscillation_faster_than_the_up_sustain_does_nothing():
    # Hot for one sample, cool for one: no run of hot samples lasts sustain_up_s.
    sim = Sim(app(), lambda t: (1.5, 8) if round(t / STEP_S) % 2 == 0 else (0.1, 1)).run(30)
    assert sim.log == []


def test_noisy_neighbour_slows_the_instance_but_more_quota_would_not_help():
    # Another process takes the host's CPU: requests are slow and the CPU pressure is high,
    # but the instance is not throttled and not using its quota.
    def figures(t):
        return (InstanceFigures(name="i0", cpu_limit=0.3, cpu_used=0.12, throttled=0.0, inflight=4.0, requests=10,
                                latency_ms=400.0, cpu_pressure=75.0),)

    history = History()
    for step in range(200):
        t = step * STEP_S
        plan = decide(AppMetrics(app=app(), instances=figures(t), history=history), t)
        history = plan.history
        assert plan.decisions == ()


def test_neighbour_app_under_load_does_not_scale_this_one():
    busy = Sim(app(name="busy.test"), lambda t: (2.0, 8)).run(10)
    quiet = Sim(app(name="quiet.test"), lambda t: (0.05, 0.2)).run(10)
    assert busy.actions()[:1] == ["scale-up"] and quiet.log == []


def test_one_hot_sample_does_not_act():
    sim = Sim(app(), lambda t: (2.0, 8) if 5 <= t < 5 + STEP_S else (0.1, 1)).run(20)
    assert sim.log == []


def test_cpu_burnt_without_requests_is_not_load():
    # A cron job inside the container: throttled, but nothing is waiting for it.
    sim = Sim(app(), lambda t: (2.0, 0.0)).run(10)
    assert sim.log == []


def test_crowded_instances_scale_out_without_being_throttled():
    a = app(cpu=1.0, cpu_max=1.0, max_instances=3, target_concurrency=4)
    sim = Sim(a, lambda t: (0.2, 12)).run(10)  # 12 requests in flight, little CPU: slow I/O
    assert sim.actions() == ["scale-out", "scale-out"]
    assert "12.0 requests in flight per instance, above the target of 4" in sim.reasons[0]
    (t1, *_), (t2, *_) = sim.log
    assert t2 - t1 >= a.cooldown_up_s


def test_a_crowded_saturated_app_gets_quota_and_an_instance_at_once():
    # The talk's burst: 96 requests in flight on one instance at 0.3 CPU (target 10). More quota
    # alone would leave them as crowded; the instance comes in the same decision, not a
    # cooldown later.
    sim = Sim(app(cooldown_up_s=10.0), lambda t: (0.1, 1) if t < 5 else (2.0, 96)).run(20)
    assert sim.actions()[:2] == ["scale-up", "scale-out"]
    (t_up, _, inst, cpu), (t_out, *_) = sim.log[:2]
    assert t_up == t_out and 5 < t_up <= 6 and (inst, cpu) == ("i0", 0.6)
    assert "96.0 requests in flight per instance, above the target of 10: 1 -> 2 instances" in sim.reasons[1]
    # The new instance's own scale-up waits for the up cooldown.
    assert sim.log[2][1:3] == ("scale-up", "i1") and sim.log[2][0] - t_up >= 10.0
    assert sim.limits == {"i0": 0.6, "i1": 0.6}


def test_saturation_is_judged_over_whole_cfs_periods():
    from fcrun.cgroups import Stats
    from fcrun.serve.monitor import figures, reading

    def stats(usage_us, periods, throttled):
        return Stats(cpu_usage_us=usage_us, nr_periods=periods, nr_throttled=throttled, throttled_us=0,
                     memory_bytes=0, pids_current=9, frozen=False)

    # 250 ms over 100 ms periods: a saturated instance at 0.3 CPU got two quotas (60 ms) in this
    # interval, and three in the next; on average over wall time that is 0.24, then 0.36 CPU.
    a, b, c = (reading(t, stats(u, p, p), busy_s=6.0 * t, completed=0, latency_s=0.0)
               for t, u, p in ((0.0, 0, 0), (0.25, 60_000, 2), (0.5, 150_000, 5)))
    first, second = figures("i0", 0.3, 0.0, a, b), figures("i0", 0.3, 0.0, b, c)
    assert first.cpu_used == pytest.approx(0.24) and first.quota_used == pytest.approx(1.0)
    assert second.cpu_used == pytest.approx(0.36) and second.quota_used == pytest.approx(1.5)
    history, decisions = History(), []
    for now, f in ((0.25, first), (0.5, second)):
        plan = decide(AppMetrics(app=app(), instances=(f,), history=history), now)
        history, decisions = plan.history, decisions + list(plan.decisions)
    assert [(d.action, d.cpu) for d in decisions] == [("scale-up", 0.6)]
    assert decisions[0].figures["quota_used"] == pytest.approx(1.5)
    # Without the period count, 0.24 of 0.3 would not be "busy": the second sample would start
    # the hot run over and the decision would come a sample later, or never.
    plain = msgspec.structs.replace(first, quota_used=None)
    assert decide(AppMetrics(app=app(), instances=(plain,), history=History(hot_since_s=0.0)), 0.25).decisions == ()


def test_max_instances_and_the_ceiling_bound_growth():
    sim = Sim(app(max_instances=1), lambda t: (5.0, 20)).run(30)
    assert sim.actions() == ["scale-up"] and sim.limits == {"i0": 0.6}
    sim = Sim(app(cpu=0.3, cpu_max=None, max_instances=1), lambda t: (5.0, 8)).run(30)
    assert sim.log == []  # no ceiling above cpu, no room for another instance


def test_one_start_at_a_time():
    a = app(cpu=0.5, cpu_max=0.5, max_instances=4, cooldown_up_s=0)
    sim = Sim(a, lambda t: (5.0, 8), start_delay_s=3.0).run(2.5)
    assert sim.actions() == ["scale-out"]  # the next waits until that one is up


def test_min_instances_are_kept_and_quota_never_goes_below_cpu():
    a = app(min_instances=2, max_instances=3, cooldown_down_s=1.0)
    sim = Sim(a, lambda t: (0.0, 0.0), instances=3)
    sim.limits = {"i0": 0.6, "i1": 0.6, "i2": 0.3}
    sim.run(30)
    assert len(sim.limits) == 2 and set(sim.limits.values()) == {0.3}
    assert all(c is None or c >= a.cpu for *_, c in sim.log)
    # The last instance is never drained by the policy (idle-timeout stops it).
    sim = Sim(app(cooldown_down_s=1.0), lambda t: (0.0, 0.0)).run(30)
    assert sim.log == []


def test_scale_in_drains_the_least_busy_then_the_newest():
    a = app(max_instances=3)
    figures = (
        InstanceFigures(name="old", cpu_limit=0.3, cpu_used=0.01, inflight=0.0, started_s=1.0),
        InstanceFigures(name="new", cpu_limit=0.3, cpu_used=0.01, inflight=0.0, started_s=50.0),
        InstanceFigures(name="busy", cpu_limit=0.3, cpu_used=0.05, inflight=0.4, started_s=60.0),
    )
    plan = decide(AppMetrics(app=a, instances=figures, history=History(calm_since_s=0.0)), 100.0)
    assert [(d.action, d.instance) for d in plan.decisions] == [("scale-in", "new")]
    assert plan.decisions[0].figures["instances"] == 3.0


def test_load_that_would_not_fit_keeps_the_capacity():
    # 0.4 CPU used over two instances at 0.3: one alone would be saturated.
    figures = (InstanceFigures(name="a", cpu_limit=0.3, cpu_used=0.2, inflight=2.0),
               InstanceFigures(name="b", cpu_limit=0.3, cpu_used=0.2, inflight=2.0))
    plan = decide(AppMetrics(app=app(), instances=figures, history=History(calm_since_s=0.0)), 1000.0)
    assert plan.decisions == () and plan.history.calm_since_s is None


def test_a_scale_up_right_after_a_scale_down_is_not_delayed():
    figures = (InstanceFigures(name="a", cpu_limit=0.3, cpu_used=0.3, throttled=0.9, inflight=6.0),)
    history = History(last_down_s=99.0, last_up_s=50.0, hot_since_s=99.5)
    plan = decide(AppMetrics(app=app(), instances=figures, history=history), 100.0)
    assert [d.action for d in plan.decisions] == ["scale-up"]
    assert plan.history.last_up_s == 100.0 and plan.history.hot_since_s is None


def test_same_input_same_output():
    figures = (InstanceFigures(name="a", cpu_limit=0.3, cpu_used=0.3, throttled=0.9, inflight=6.0),)
    metrics = AppMetrics(app=app(), instances=figures, history=History(hot_since_s=0.0))
    assert decide(metrics, 1.0) == decide(metrics, 1.0)


@pytest.mark.parametrize("tuning", [Tuning(up_factor=1.5), Tuning(up_factor=4.0)])
def test_steps_follow_the_tuning_and_stop_at_the_ceiling(tuning):
    a = app(cpu=0.2, cpu_max=0.9, max_instances=1, cooldown_up_s=0.0)
    figures = lambda cpu: (InstanceFigures(name="a", cpu_limit=cpu, cpu_used=cpu, throttled=1.0, inflight=3.0),)
    cpu, history, seen = 0.2, History(), []
    for step in range(40):
        plan = decide(AppMetrics(app=a, instances=figures(cpu), history=history), step * STEP_S, tuning)
        history = plan.history
        for d in plan.decisions:
            cpu = d.cpu
            seen.append(cpu)
    assert seen[-1] == 0.9 and all(x < y for x, y in zip(seen, seen[1:]))
    assert seen[0] == pytest.approx(min(0.9, 0.2 * tuning.up_factor))


def test_figures_are_the_difference_of_two_readings():
    from fcrun.cgroups import Stats
    from fcrun.serve.monitor import figures, reading

    def stats(usage_us, periods, throttled, psi=None):
        return Stats(cpu_usage_us=usage_us, nr_periods=periods, nr_throttled=throttled, throttled_us=0,
                     memory_bytes=64 << 20, pids_current=9, frozen=False, cpu_pressure=psi)

    prev = reading(10.0, stats(1_000_000, 100, 10), busy_s=5.0, completed=50, latency_s=2.0)
    cur = reading(10.5, stats(1_150_000, 105, 14, {"some": {"avg10": 12.5, "total": 9.0}}), busy_s=7.0,
                  completed=60, latency_s=2.5)
    f = figures("web-1", 0.3, 1.0, prev, cur)
    assert f.cpu_used == pytest.approx(0.3) and f.throttled == pytest.approx(0.8)
    assert f.inflight == pytest.approx(4.0) and f.requests == 10 and f.latency_ms == pytest.approx(50.0)
    assert f.memory_bytes == 64 << 20 and f.cpu_pressure == 12.5 and f.cpu_limit == 0.3
    # An unreadable cgroup (the instance just went) gives zeros, never negative rates.
    gone = reading(11.0, None, busy_s=7.0, completed=60, latency_s=2.5)
    f = figures("web-1", 0.3, 1.0, cur, gone)
    assert (f.cpu_used, f.throttled, f.inflight, f.requests, f.latency_ms) == (0.0, 0.0, 0.0, 0, None)
    assert figures("web-1", 0.3, 1.0, cur, cur).cpu_used == 0.0  # no time passed
