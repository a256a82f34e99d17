"""Container networking: a host bridge, one isolated veth per container, persisted leases.

``BridgeNetwork`` wires a container's network namespace to the bridge (``attach``) and
unwires it (``detach``, ``gc``); ``IPAM`` hands out the addresses; ``setup_loopback`` is all
a ``--net none`` container gets. Kernel access is the small rtnetlink client in ``rtnl``.
"""

from .bridge import Attachment, BridgeNetwork, host_ifname, mac_for, setup_loopback
from .ipam import IPAM, AddressLease, SubnetFull, parse_subnet

__all__ = [
    "IPAM",
    "Attachment",
    "BridgeNetwork",
    "AddressLease",
    "SubnetFull",
    "host_ifname",
    "mac_for",
    "parse_subnet",
    "setup_loopback",
]
