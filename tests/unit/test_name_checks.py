"""Names checked by a regular expression are checked whole: a trailing newline is refused.

Python's ``$`` also matches before a string's last "\\n", so ``re.match(r"^[a-z]+$", "abc\\n")``
succeeds; each check here once let such a name through (a container's state file named
"name\\n", a bridge "br\\n" handed to the kernel). They use ``fullmatch`` now.
"""

import pytest

from fcrun.errors import SpecError
from fcrun.forkserver import protocol as p
from fcrun.network.bridge import validate_bridge_name
from fcrun.network.ipam import IPAM
from fcrun.runtime.spec import HugepageLimit, Resources, default_spec
from fcrun.runtime.spec_checks import validate_spec
from fcrun.runtime.state import validate_name

LIMITS = p.InstanceLimits(cpu=0.5, memory_bytes=64 << 20)


def spec_with(sysctl=None, page_size=None):
    spec = default_spec(["sh"])
    if sysctl is not None:
        spec.linux.sysctl = {sysctl: "1"}
    if page_size is not None:
        spec.linux.resources = Resources(hugepage_limits=[HugepageLimit(page_size=page_size, limit=0)])
    return spec


CHECKS = {
    "container name": validate_name,
    "bridge name": validate_bridge_name,
    "network name": lambda name: IPAM("/nonexistent", name=name),
    "fork-server image": lambda name: p.check_request(p.Claim(image=name, labels={}, limits=LIMITS)),
    "fork-server label key": lambda name: p.check_request(p.Claim(image="busybox", labels={name: "v"}, limits=LIMITS)),
    "sysctl": lambda name: validate_spec(spec_with(sysctl=name)),
    "hugepage size": lambda name: validate_spec(spec_with(page_size=name)),
}
GOOD = {"container name": "web-1", "bridge name": "fcrun0", "network name": "default", "fork-server image": "busybox",
        "fork-server label key": "fcrun.app", "sysctl": "net.ipv4.ip_forward", "hugepage size": "2MB"}


@pytest.mark.parametrize("what", sorted(CHECKS))
def test_a_name_with_a_trailing_newline_is_refused(what):
    CHECKS[what](GOOD[what])   # the name itself passes
    with pytest.raises(SpecError):
        CHECKS[what](GOOD[what] + "\n")
