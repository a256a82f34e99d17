"""/metrics: the histograms metering keeps, and the Prometheus text (0.0.4) rendered from
AppStats, checked by a strict parser of the format written here (prometheus_client is not a
dependency), so that a line Prometheus would refuse fails a test."""

from __future__ import annotations

import math
import re

import msgspec
import pytest

from fcrun.cmdb.models import AppStats, Histogram, InstanceCounts
from fcrun.serve.instances import Instance, InstanceState
from fcrun.serve.metering import COLD_PATHS, COLD_START_BOUNDS_S, REQUEST_BOUNDS_S, DurationHistogram, Meter
from fcrun.serve.metrics import BuildInfo, build_info, host_cgroup_version, render_metrics

BUILD = BuildInfo(version="0.1.0", python="3.11.2", cgroup="v1")

# -- a strict parser of the text exposition format 0.0.4 -----------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
SAMPLE = re.compile(rf"({NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?")
HELP = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


class Family(msgspec.Struct):
    kind: str
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = []


def parse_labels(text: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, f"bad label at {text[pos:]!r} in {line!r}"
        assert m.group(1) not in labels, f"label {m.group(1)} twice in {line!r}"
        labels[m.group(1)] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), m.group(2))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"no comma after a label in {line!r}"
            pos += 1
    return labels


def parse_value(text: str, line: str) -> float:
    number = r"[+-]?(Inf|NaN|\d+(\.\d*)?([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)"
    assert re.fullmatch(number, text), f"bad value in {line!r}"
    return float(text)


def parse(text: str) -> dict[str, Family]:
    """Families by name. Fails on what Prometheus refuses: a malformed line, a sample before its
    family's TYPE or apart from its family's other lines, a series twice, a histogram whose
    buckets are not cumulative up to +Inf == _count."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families: dict[str, Family] = {}
    current = None
    seen: set[tuple[str, tuple]] = set()
    for line in text.splitlines():
        if m := HELP.fullmatch(line):
            assert m.group(1) not in families, f"HELP after TYPE or twice: {line!r}"
            families[m.group(1)] = Family(kind="", help=m.group(2))
            current = m.group(1)
            continue
        if m := TYPE.fullmatch(line):
            family = families.setdefault(m.group(1), Family(kind=""))
            assert not family.kind and not family.samples, f"TYPE twice or after samples: {line!r}"
            family.kind, current = m.group(2), m.group(1)
            continue
        assert not line.startswith("#") and line.strip(), f"not a comment this format knows: {line!r}"
        m = SAMPLE.fullmatch(line)
        assert m, f"malformed sample {line!r}"
        name, labels, value = m.group(1), parse_labels(m.group(2) or "", line), parse_value(m.group(3), line)
        assert current is not None and families[current].kind, f"{line!r} before any TYPE"
        kind = families[current].kind
        assert name in [current + s for s in SUFFIXES.get(kind, ("",))], f"{name} is not of family {current}"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"series twice: {line!r}"
        seen.add(key)
        families[current].samples.append((name, labels, value))
    for name, family in families.items():
        if family.kind == "counter":
            assert name.endswith("_total") and all(v >= 0 for _, _, v in family.samples), name
        if family.kind == "histogram":
            check_histogram(name, family)
    return families


def check_histogram(name: str, family: Family) -> None:
    series: dict[tuple, dict[str, list]] = {}
    for sample, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        part = series.setdefault(key, {"buckets": [], "sum": [], "count": []})
        if sample.endswith("_bucket"):
            part["buckets"].append((float(labels["le"]), value))
        else:
            assert "le" not in labels
            part[sample.rpartition("_")[2]].append(value)
    for key, part in series.items():
        les = [le for le, _ in part["buckets"]]
        counts = [c for _, c in part["buckets"]]
        assert les == sorted(les) and len(set(les)) == len(les) and les[-1] == math.inf, (name, key, les)
        assert counts == sorted(counts), f"{name}{key}: buckets not cumulative: {counts}"
        assert part["count"] == [counts[-1]] and len(part["sum"]) == 1, (name, key)


def value_of(families: dict[str, Family], sample: str, **labels: str) -> float:
    family = families[re.sub(r"_(bucket|sum|count)$", "", sample) if sample not in families else sample]
    (value,) = [v for n, lab, v in family.samples if n == sample and lab == labels]
    return value


def test_the_parser_refuses_what_prometheus_refuses():
    good = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\"} 2\n"
    parse(good)
    for bad in [good.replace('a="1"', "a=1"), good + 'x_total{a="1"} 3\n', good.replace("} 2", "} two"),
                good.replace("# TYPE x_total counter\n", ""), good.rstrip("\n"),
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n"]:
        with pytest.raises(AssertionError):
            parse(bad)


# -- the histogram ---------------------------------------------------------------------------------


def test_a_value_on_a_bound_counts_in_that_bucket_and_snapshots_are_cumulative():
    h = DurationHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.0011, 0.01, 0.5, 0.0):
        h.observe(seconds)
    snap = h.snapshot()
    assert snap == Histogram(bounds=[0.001, 0.01, 0.1], counts=[3, 5, 5, 6], sum=0.5126, count=6)
    h.observe(0.05)
    assert snap.counts == [3, 5, 5, 6] and h.snapshot().counts == [3, 5, 6, 7]  # a copy, not a view


def test_bounds_ascend_and_the_default_histogram_is_valid():
    for bounds in (REQUEST_BOUNDS_S, COLD_START_BOUNDS_S):
        assert list(bounds) == sorted(set(bounds)) and bounds[-1] >= 30.0  # the hold timeout's default
    empty = Histogram()
    assert len(empty.counts) == len(empty.bounds) + 1 and empty.counts[-1] == empty.count == 0


def test_the_meter_observes_requests_and_cold_starts_by_path():
    meter = Meter()
    meter.request_done(200, 0.003, False)
    meter.request_done(502, 40.0, True)
    meter.cold_start("pool", 0.0048)
    meter.cold_start("thaw", 0.002)
    stats = meter.stats([], NoCgroups(), now=0.0)
    assert stats.request_duration.count == 2 and stats.request_duration.sum == 40.003
    assert stats.request_duration.counts[REQUEST_BOUNDS_S.index(0.005)] == 1 and stats.request_duration.counts[-1] == 2
    assert set(stats.cold_start_duration) == set(COLD_PATHS) == set(stats.cold_paths)
    assert {p: (h.count, stats.cold_paths[p]) for p, h in stats.cold_start_duration.items()} == {
        "thaw": (1, 1), "pool": (1, 1), "start": (0, 0)}
    assert stats.cold_start_duration["thaw"].counts[COLD_START_BOUNDS_S.index(0.002)] == 1  # le: on the bound
    # What GET /stats sends, read back as the dashboard reads it.
    assert msgspec.json.decode(msgspec.json.encode(stats), type=AppStats) == stats


def test_instances_are_counted_by_the_state_the_cmdb_would_record():
    live = [instance(f"i{n}", state) for n, state in enumerate(
        [InstanceState.READY, InstanceState.REPLACING, InstanceState.FREEZING, InstanceState.FROZEN,
         InstanceState.DRAINING])]
    counts = Meter().stats(live, NoCgroups(), now=0.0, starting=3).instances
    assert counts == InstanceCounts(ready=2, total=5, frozen=2, draining=1, starting=3)


class NoCgroups:
    def cpu_seconds(self, name):
        return 0.0

    def cgroup_stats(self, name):
        return None


def instance(name: str, state: InstanceState) -> Instance:
    inst = Instance(name=name, app="a.test", ip="10.0.0.2", port=80, started_at=0.0, started_mono=0.0,
                    last_active=0.0)
    inst.state = state  # set up directly: the counting is what is tested
    return inst


# -- the text --------------------------------------------------------------------------------------


def busy_stats() -> AppStats:
    meter = Meter()
    for seconds, status in ((0.0004, 200), (0.003, 200), (0.2, 404), (31.0, 504)):
        meter.request_done(status, seconds, status >= 500)
    meter.cold_start("start", 0.05)
    return meter.stats([instance("i1", InstanceState.READY)], NoCgroups(), now=0.0, starting=1)


def test_the_text_is_valid_and_says_what_the_stats_say():
    families = parse(render_metrics({"a.test": busy_stats(), "idle.test": AppStats()}, BUILD))
    assert families["fcrun_build_info"].kind == "gauge"
    assert value_of(families, "fcrun_build_info", version="0.1.0", python="3.11.2", cgroup="v1") == 1
    assert families["fcrun_request_duration_seconds"].kind == "histogram"
    assert value_of(families, "fcrun_request_duration_seconds_count", app="a.test") == 4
    assert value_of(families, "fcrun_request_duration_seconds_sum", app="a.test") == 31.2034
    assert value_of(families, "fcrun_request_duration_seconds_bucket", app="a.test", le="0.0005") == 1
    assert value_of(families, "fcrun_request_duration_seconds_bucket", app="a.test", le="30.0") == 3
    assert value_of(families, "fcrun_request_duration_seconds_bucket", app="a.test", le="+Inf") == 4
    assert value_of(families, "fcrun_requests_total", app="a.test", code="5xx") == 1
    assert value_of(families, "fcrun_requests_total", app="a.test", code="2xx") == 2
    assert {lab["state"]: v for _, lab, v in families["fcrun_instances"].samples if lab["app"] == "a.test"} == {
        "ready": 1, "frozen": 0, "starting": 1, "draining": 0}
    # A cold-start histogram for the path taken only; the counters for every path.
    cold = families["fcrun_cold_start_duration_seconds"].samples
    assert {(lab["app"], lab["path"]) for _, lab, _ in cold} == {("a.test", "start")}
    assert value_of(families, "fcrun_cold_start_duration_seconds_bucket", app="a.test", path="start", le="0.05") == 1
    assert value_of(families, "fcrun_cold_starts_total", app="a.test", path="thaw") == 0
    # An app with no stats yet (serve not running: the CMDB's rows only) still renders validly.
    assert value_of(families, "fcrun_request_duration_seconds_bucket", app="idle.test", le="+Inf") == 0


def test_the_old_names_are_gone():
    text = render_metrics({"a.test": busy_stats()}, BUILD)
    for old in ("fcrun_instances_frozen", "fcrun_request_seconds_total", 'class="'):
        assert old not in text


def test_label_values_are_escaped_and_read_back_unchanged():
    name = 'we"ird\\app\nx'
    families = parse(render_metrics({name: busy_stats()}, BuildInfo(version='1"2', python="3", cgroup="v2")))
    assert value_of(families, "fcrun_request_duration_seconds_count", app=name) == 4
    assert value_of(families, "fcrun_build_info", version='1"2', python="3", cgroup="v2") == 1


def test_a_thousand_apps_stay_within_a_sane_number_of_series():
    """Cardinality, not speed: with no cold start by a path, its histogram is not sent."""
    text = render_metrics({f"app{n}.test": busy_stats() for n in range(1000)}, BUILD)
    families = parse(text)
    per_app = sum(len(f.samples) for f in families.values()) / 1000
    # requests 5 + request histogram 18 + cpu, instance seconds, freezes 3 + instances 4 + memory 2
    # + cold counters 3 + one cold histogram 20.
    assert per_app == pytest.approx(5 + 18 + 3 + 4 + 2 + 3 + 20, abs=0.01)


def test_the_cgroup_version_is_the_one_detect_would_pick(tmp_path):
    line = "{id} 1 0:{id} / {mountpoint} rw - {fstype} {fstype} rw\n"
    v2 = tmp_path / "v2"
    v2.write_text(line.format(id=30, mountpoint="/sys/fs/cgroup", fstype="cgroup2"))
    hybrid = tmp_path / "hybrid"  # a tmpfs at the root, controller-less cgroup2 beneath: v1 to fcrun
    hybrid.write_text(line.format(id=30, mountpoint="/sys/fs/cgroup", fstype="tmpfs")
                      + line.format(id=31, mountpoint="/sys/fs/cgroup/unified", fstype="cgroup2")
                      + line.format(id=32, mountpoint="/sys/fs/cgroup/cpu", fstype="cgroup"))
    assert host_cgroup_version(str(v2)) == "v2"
    assert host_cgroup_version(str(hybrid)) == "v1"
    assert host_cgroup_version(str(tmp_path / "missing")) == "unknown"
    assert build_info().cgroup in ("v1", "v2") and build_info().python.count(".") == 2


def test_the_sample_dashboard_uses_only_metrics_that_exist():
    """docs/grafana-dashboard.json follows the names: each series an expression names is one
    render_metrics sends, with labels it has."""
    import json
    import pathlib

    dashboard = json.loads((pathlib.Path(__file__).resolve().parents[2] / "docs/grafana-dashboard.json").read_text())
    families = parse(render_metrics({"a.test": busy_stats()}, BUILD))
    labels_of = {}
    for family in families.values():
        for name, labels, _ in family.samples:
            labels_of.setdefault(name, set()).update(labels)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]) and exprs
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for name, selector in re.findall(r"\b(fcrun_\w+)(?:\{([^}]*)\})?", expr):
            assert name in labels_of, f"{name} in {expr!r} is not a series /metrics sends"
            for label in re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector):
                assert label in labels_of[name], f"{name} has no label {label} ({expr!r})"
        for label in re.findall(r"by \(([^)]*)\)", expr):
            for one in label.split(","):
                assert any(one.strip() in labels for labels in labels_of.values()), (one, expr)
