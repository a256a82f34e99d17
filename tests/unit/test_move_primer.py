"""cgroups/primer.py's group names: beneath the cgroup parent beside the containers' groups,
so they must never be a container's (remove_stale removes empty ones)."""

import pytest

from fcrun.cgroups.base import check_name
from fcrun.cgroups.primer import group_name, is_group_name
from fcrun.errors import SpecError
from fcrun.runtime.state import validate_name


@pytest.mark.parametrize("pid", [1, 4321, 4194304])
def test_a_primer_group_is_a_valid_cgroup_name_and_never_a_valid_container_name(pid):
    name = group_name(pid)
    assert check_name(name) == name and is_group_name(name)
    with pytest.raises(SpecError):
        validate_name(name)


@pytest.mark.parametrize("name", [
    "fcrun-move-primer-1234",  # a container may be called this: not a primer's group
    "fcrun-move-primer-12a4".ljust(130, "_"),
    "fcrun-move-primer-".ljust(130, "_"),
    "fcrun-move-primer-1234".ljust(131, "_"),
    "web-1",
])
def test_other_names_are_not_primer_groups(name):
    assert not is_group_name(name)
