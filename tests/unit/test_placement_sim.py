"""The placement simulation (bench/placement_sim.py) at a tiny size: its invariants hold at every
step, and its shortcut around `policy.decide` gives what `decide` gives. No timings."""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest

from fcrun.cluster.placement import Policy
from fcrun.cmdb.models import App
from fcrun.serve.policy import AppMetrics, History, InstanceFigures, decide

SIM_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "placement_sim.py"


@pytest.fixture(scope="module")
def sim_module():
    spec = importlib.util.spec_from_file_location("placement_sim", SIM_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("apps, nodes, ratio", [(400, 10, 1.0), (3000, 4, 1.0), (3000, 4, 1.5)])
def test_every_step_keeps_the_placement_rules(sim_module, apps, nodes, ratio):
    sim = sim_module.Sim(apps, nodes, hours=2.0, seed=3, policy=Policy(memory_overcommit=ratio), check=True)
    sim.run()  # check=True: every start is on an up node below the app's max, no node past its ratio
    for node in sim.nodes:
        assert node.memory_reserved_bytes <= node.memory_capacity_bytes * ratio
        assert node.instances == len(node.held)
        assert node.cpu_reserved == pytest.approx(sum(i.quota for i in node.held), abs=1e-6)
        if node.state != "up":
            assert not node.held, f"{node.name} is {node.state} and still runs instances"
    for a in sim.apps:
        assert len(a.instances) <= a.app.max_instances
        assert all(i in i.node.held for i in a.instances)
    report = sim.report()
    assert report["decision_time_us"]["n"] == sim.counts["cold_starts"] + sim.counts["scale_outs"] + \
        sim.counts["refused_no_capacity"] + sim.counts["refused_at_max"]
    assert sim.counts["cold_starts"] > 0 and sim.counts["events"] > 0


def test_a_crowded_cluster_refuses_and_a_higher_ratio_refuses_less(sim_module):
    refused = {}
    for ratio in (1.0, 2.0):
        sim = sim_module.Sim(3000, 3, hours=1.0, seed=5, policy=Policy(memory_overcommit=ratio), check=True)
        sim.run()
        refused[ratio] = sim.counts["refused_no_capacity"]
    assert refused[1.0] > refused[2.0]


def test_the_shortcut_is_what_decide_returns(sim_module):
    rng = random.Random(11)
    checked = 0
    for _ in range(500):
        cpu = rng.choice((0.25, 0.5, 1.0))
        app = App(name="s.example", image="apache-php", cpu=cpu, cpu_max=2 * cpu, max_instances=rng.randint(1, 4),
                  min_instances=rng.randint(0, 1))
        quota = cpu
        offered = rng.uniform(0, 1.2) * quota
        inst = sim_module.SimInstance(None, None, quota, 0.0, "i1")
        figures = sim_module.instance_figures(inst, offered, offered / 0.05, 0.05)
        hot = (figures.throttled >= 0.2 and figures.cpu_used >= 0.85 * figures.cpu_limit and figures.inflight >= 0.5
               or figures.inflight > app.target_concurrency)
        if hot:
            continue
        history = History(last_up_s=rng.choice([None, 5.0]), last_down_s=rng.choice([None, 7.0]),
                          hot_since_s=rng.choice([None, 3.0]), calm_since_s=rng.choice([None, 4.0]))
        plan = decide(AppMetrics(app=app, instances=(figures,), history=history), 100.0)
        assert plan.decisions == ()
        assert plan.history == sim_module.shortcut_history(history)
        checked += 1
    assert checked > 100


def test_figures_of_an_overloaded_instance_make_decide_act(sim_module):
    app = App(name="s.example", image="apache-php", cpu=0.5, cpu_max=1.0, max_instances=3, cooldown_up_s=0)
    inst = sim_module.SimInstance(None, None, 0.5, 0.0, "i1")
    figures = sim_module.instance_figures(inst, 2.0, 40.0, 0.05)
    assert isinstance(figures, InstanceFigures) and figures.throttled >= 0.2
    first = decide(AppMetrics(app=app, instances=(figures,)), 0.0)
    plan = decide(AppMetrics(app=app, instances=(figures,), history=first.history), 15.0)
    assert {d.action for d in plan.decisions} == {"scale-up", "scale-out"}
