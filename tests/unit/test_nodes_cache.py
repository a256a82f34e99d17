"""cluster/nodes_cache.py: fronts and nodes read the `nodes` table once a second, and age its
rows locally between reads, so that a node that stops beating is seen down on time."""

import pytest

from fcrun.cmdb.base import CMDBError, NODE_LEASE_S
from fcrun.cmdb.nodes import NodeRecord
from fcrun.cluster.nodes_cache import NODES_REFRESH_S, NodesCache


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Table:
    """list_nodes over a table whose rows' ages the test sets; counts the reads."""

    def __init__(self):
        self.ages = {"n1": 0.2, "n2": 0.9}
        self.reads = 0
        self.fail = False

    def list_nodes(self):
        self.reads += 1
        if self.fail:
            raise CMDBError("connection refused")
        return [NodeRecord(name=n, role="node", address="10.0.0.1:80", admin_state="active", figures={}, age_s=a)
                for n, a in sorted(self.ages.items())]


@pytest.fixture
def setup():
    clock, table = Clock(), Table()
    return clock, table, NodesCache(table.list_nodes, clock=clock)


def test_reads_within_a_second_are_served_from_the_last_read_with_ages_advanced(setup):
    clock, table, cache = setup
    assert [r.age_s for r in cache.read()] == [0.2, 0.9] and table.reads == 1
    clock.now += 0.25
    assert [round(r.age_s, 2) for r in cache.read()] == [0.45, 1.15]
    clock.now += 0.5
    assert [round(r.age_s, 2) for r in cache.read()] == [0.95, 1.65]
    assert table.reads == 1  # four refreshes a second cost one read
    clock.now += NODES_REFRESH_S - 0.75
    table.ages = {"n1": 0.05, "n2": 0.1}
    assert [r.age_s for r in cache.read()] == [0.05, 0.1] and table.reads == 2


def test_a_node_that_stops_beating_is_down_lease_s_after_its_last_beat_not_a_read_later(setup):
    clock, table, cache = setup
    table.ages = {"n1": 0.2, "n2": 2.9}  # n2's last beat was 2.9 s ago
    assert [r.state() for r in cache.read()] == ["active", "active"]
    clock.now += 0.25  # the next 0.25 s refresh, from the cache: 3.15 s > NODE_LEASE_S
    assert NODE_LEASE_S < 3.15
    assert [r.state() for r in cache.read()] == ["active", "down"]
    assert table.reads == 1


def test_a_failed_read_is_raised_and_tried_again_at_the_next_call(setup):
    clock, table, cache = setup
    cache.read()
    clock.now += NODES_REFRESH_S
    table.fail = True
    with pytest.raises(CMDBError):
        cache.read()
    table.fail = False
    clock.now += 0.25
    assert [r.name for r in cache.read()] == ["n1", "n2"] and table.reads == 3  # not 0.75 s later
