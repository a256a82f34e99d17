"""cli/run_here.py's order of work for `fcrun run` without a fork-server, with the kernel faked:
the move primer starts only for a run that will make a container (options good, root, image
found) on a driver whose self-join is not cheap (v2), before the runtime is made, and ends once
the container runs, before the wait; on v1 none starts."""

from __future__ import annotations

import types

import pytest

import fcrun.cgroups
import fcrun.cgroups.primer
import fcrun.errors
import fcrun.images.catalog
import fcrun.runtime.lifecycle
from fcrun.errors import NotFound, NotPermitted
from fcrun.images.image import Image, ImageConfig
from fcrun_cli import run_here

FIELDS = dict(data_root="/nonexistent/data", cgroup_parent="fcrun-test", bridge="fct0", subnet="10.239.0.0/24",
              image="app", args=["true"], network="none")


@pytest.fixture(params=[False])
def events(monkeypatch, request):
    events: list = []  # what happened, in order
    driver = types.SimpleNamespace(self_join_is_cheap=request.param)

    class FakePrimer:
        def __init__(self, cgroups, *, primed=False):
            assert cgroups is driver
            events.append(("primer", primed))

        def close(self):
            events.append("primer closed")

    class FakeContainer:
        pid = 4242

        def wait(self, *, record=True):
            events.append(("wait", record))
            return 3

    class FakeRuntime:
        def __init__(self, paths, *, cgroup_parent, bridge, subnet, cgroups):
            events.append(("runtime", cgroups is driver, cgroup_parent))
            self.paths = paths
            self.move_primer = None

        def run(self, name, spec, **options):
            events.append(("run", self.move_primer is not None))
            return FakeContainer()

        def delete(self, name, force=False):
            events.append("delete")

    def get_image(paths, name):
        if name != "app":
            raise NotFound(f"image {name!r} not found")
        events.append("image")
        return Image(name="app", id="sha256:" + "ab" * 32, layers=["/nonexistent/layer"], diff_ids=[],
                     config=ImageConfig(), created=0.0, source="test", size_bytes=0)

    monkeypatch.setattr(fcrun.errors, "require_root", lambda: events.append("root"))
    monkeypatch.setattr(fcrun.images.catalog, "get_image", get_image)
    monkeypatch.setattr(fcrun.cgroups, "detect", lambda parent: events.append(("detect", parent)) or driver)
    monkeypatch.setattr(fcrun.cgroups.primer, "MovePrimer", FakePrimer)
    monkeypatch.setattr(fcrun.runtime.lifecycle, "Runtime", FakeRuntime)
    return events


def test_the_primer_starts_after_the_image_before_the_runtime_and_ends_before_the_wait(events):
    assert run_here.run_fields("/nonexistent/run", FIELDS) == 3
    assert events == ["root", "image", ("detect", "fcrun-test"), ("primer", True), ("runtime", True, "fcrun-test"),
                      ("run", True), "primer closed", ("wait", False), "delete"]


@pytest.mark.parametrize("events", [True], indirect=True)
def test_no_primer_where_the_child_joins_its_cgroup_itself(events):
    assert run_here.run_fields("/nonexistent/run", FIELDS) == 3
    assert events == ["root", "image", ("detect", "fcrun-test"), ("runtime", True, "fcrun-test"),
                      ("run", False), ("wait", False), "delete"]


@pytest.mark.parametrize("change", [{"pids": 0}, {"cpu": "lots"}, {"network": "nope"}, {"image": "missing"}])
def test_a_run_that_fails_before_its_container_starts_no_primer(events, change, capsys):
    assert run_here.run_fields("/nonexistent/run", {**FIELDS, **change}) == 125
    assert not any(isinstance(e, tuple) and e[0] in ("primer", "runtime") for e in events), events
    assert capsys.readouterr().err.startswith("fcrun: ")


def test_not_root_starts_no_primer(events, monkeypatch, capsys):
    def not_root():
        raise NotPermitted("fcrun needs root")

    monkeypatch.setattr(fcrun.errors, "require_root", not_root)
    assert run_here.run_fields("/nonexistent/run", FIELDS) == 125
    assert events == [] and "needs root" in capsys.readouterr().err
