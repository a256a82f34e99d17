"""User namespace id range leases (runtime/userns.py): whole or absent, never ownerless."""

from __future__ import annotations

import os
import time

import pytest

from fcrun.errors import ContainerError
from fcrun.runtime import userns
from fcrun.runtime.userns import FIRST_HOST_ID, RANGE_SIZE, IdRanges


def test_leases_are_distinct_named_by_owner_and_released_only_by_it(tmp_path):
    ranges = IdRanges(str(tmp_path / "idmap"))
    bases = {ranges.allocate(f"c{i}") for i in range(20)}
    assert len(bases) == 20
    assert all(b >= FIRST_HOST_ID and (b - FIRST_HOST_ID) % RANGE_SIZE == 0 for b in bases)
    owners = ranges.owners()
    assert sorted(owners.values()) == sorted(f"c{i}" for i in range(20))
    base, owner = next(iter(owners.items()))
    ranges.release(base, "someone-else")
    assert ranges.owners()[base] == owner
    ranges.release(base, owner)
    assert base not in ranges.owners()
    # no temporary is left by a lease that succeeded
    assert sorted(os.listdir(tmp_path / "idmap")) == sorted(str((b - FIRST_HOST_ID) // RANGE_SIZE)
                                                           for b in ranges.owners())


def test_a_held_range_is_never_handed_out_again(tmp_path, monkeypatch):
    monkeypatch.setattr(userns, "RANGES", 3)   # a tiny table: every range gets tried
    ranges = IdRanges(str(tmp_path))
    got = {ranges.allocate(f"c{i}") for i in range(3)}
    assert len(got) == 3
    with pytest.raises(ContainerError, match="no free user namespace id range"):
        ranges.allocate("c4")
    assert sorted(ranges.owners().values()) == ["c0", "c1", "c2"]


def test_a_lease_appears_with_its_owner_or_not_at_all(tmp_path, monkeypatch):
    ranges = IdRanges(str(tmp_path))

    def crash(*_):  # the writer dies (here: fails) after writing its temporary, before link
        raise KeyboardInterrupt

    monkeypatch.setattr(userns.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        ranges.allocate("c1")
    monkeypatch.undo()
    assert ranges.owners() == {}                      # no ownerless lease
    assert os.listdir(tmp_path) == []                 # and its temporary went too


def test_gc_clears_temporaries_of_killed_writers_but_not_fresh_ones(tmp_path):
    ranges = IdRanges(str(tmp_path))
    old = tmp_path / ".lease.abc123.tmp"
    old.write_text("dead-writer")
    then = time.time() - 3600
    os.utime(old, (then, then))
    fresh = tmp_path / ".lease.def456.tmp"
    fresh.write_text("live-writer")
    assert ranges.remove_stale_temps() == [str(old)]
    assert fresh.exists() and ranges.owners() == {}
