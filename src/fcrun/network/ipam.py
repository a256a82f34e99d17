"""IPv4 address leases for one container network, in a file that many fcrun processes share.

Every read-modify-write holds an exclusive flock on a lock file next to the leases file, and
the new table replaces the old one atomically (atomicfile.write_atomic: a unique temporary,
fsync, rename, directory fsync), so a crash leaves the old or the new table, never half of
one. The fsyncs matter only where the run root is on a disk (on tmpfs they cost nothing):
there a power loss could otherwise leave an empty file.

A leases file that cannot be read back (garbage, torn, wrong types, addresses outside the
subnet) is moved aside (``leases-<name>.json.corrupt-<time>``, kept for the operator) and the
table is rebuilt from the containers' own states (the ``recover`` callable: owner -> address,
`StateStore.leases_on`), with a warning naming the file and what was wrong. Rebuilding rather
than starting empty: an empty table would hand a live container's address, and so its MAC
(``bridge.mac_for``), to the next one, and the host would send one's traffic to the other.
Without ``recover`` (the IPAM used on its own) the table starts empty, and the warning says so.

Addresses are handed out round-robin, as CNI's host-local plugin does: the next free one
after the last handed out, wrapping around. A freed address is thus not reused until the
subnet has been gone through, so a veth still being torn down by the kernel (and the bridge's
forwarding entry pointing at it) never stands between the host and a new container that got
the same address. Should reuse come sooner (small subnets), the container's MAC is derived from
its address (``bridge.mac_for``), so the host's ARP entry for it is right anyway.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

from ..atomicfile import quarantine, remove_stale_temps, write_atomic
from ..errors import FcrunError, KernelError, SpecError
from ..paths import DEFAULT_SUBNET

log = logging.getLogger(__name__)

MIN_PREFIXLEN = 8
MAX_PREFIXLEN = 30  # a /30 holds the gateway and one container
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SubnetFull(FcrunError):
    """Every container address of the subnet is leased."""

    http_status = 503


class AddressLease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One container's address: ``ip/prefixlen``, reaching the host at ``gateway``."""

    ip: str
    prefixlen: int
    gateway: str


class LeaseFile(msgspec.Struct, forbid_unknown_fields=True):
    """What ``leases-<name>.json`` holds."""

    subnet: str
    leases: dict[str, str] = {}  # owner -> ip
    last_ip: str | None = None  # the address handed out last; the next search starts after it


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LeaseFile)


def parse_subnet(text: str, where: str = "subnet") -> ipaddress.IPv4Network:
    """'10.88.0.0/16' -> IPv4Network, refusing what cannot be a container bridge subnet.

    Raises:
        SpecError: not an IPv4 network, host bits set, prefix outside /8../30, or a special
            range (loopback, link-local, multicast, reserved).
    """
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"invalid subnet {text!r}: {exc}", where) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise SpecError(f"invalid subnet {text!r}: only IPv4 is supported", where)
    if not MIN_PREFIXLEN <= net.prefixlen <= MAX_PREFIXLEN:
        raise SpecError(
            f"invalid subnet {text!r}: prefix length must be /{MIN_PREFIXLEN} to /{MAX_PREFIXLEN}"
            " (the gateway and at least one container need an address)",
            where,
        )
    if (
        net.is_loopback
        or net.is_link_local
        or net.is_multicast
        or net.is_reserved
        or net.is_unspecified
    ):
        raise SpecError(
            f"invalid subnet {text!r}: a special-purpose range cannot be a container network", where
        )
    return net


class LeaseTable:
    """The leases as read under the lock. Changes are written back when the lock is released,
    and only if the block holding it ends without an exception."""

    def __init__(
        self, subnet: ipaddress.IPv4Network, leases: dict[str, str], last_ip: str | None = None
    ):
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self._leases = dict(leases)
        self.last_ip = last_ip
        self.changed = False

    def __len__(self) -> int:
        return len(self._leases)

    def _lease(self, ip: str) -> AddressLease:
        return AddressLease(ip=ip, prefixlen=self.subnet.prefixlen, gateway=str(self.gateway))

    def get(self, owner: str) -> AddressLease | None:
        ip = self._leases.get(owner)
        return None if ip is None else self._lease(ip)

    def allocate(self, owner: str) -> AddressLease:
        """The next free address after the last one handed out (wrapping around, never the
        network, gateway or broadcast address); ``owner``'s existing lease if it has one.

        Raises:
            SpecError: empty owner.
            SubnetFull: no address left.
        """
        if not owner:
            raise SpecError("lease owner must not be empty", "owner")
        existing = self.get(owner)
        if existing is not None:
            return existing
        used = {int(ipaddress.IPv4Address(ip)) for ip in self._leases.values()}
        first = int(self.gateway) + 1
        last = int(self.subnet.broadcast_address) - 1
        start = first
        if self.last_ip is not None and first <= int(ipaddress.IPv4Address(self.last_ip)) < last:
            start = int(ipaddress.IPv4Address(self.last_ip)) + 1
        for candidate in itertools.chain(range(start, last + 1), range(first, start)):
            if candidate not in used:
                ip = str(ipaddress.IPv4Address(candidate))
                self._leases[owner] = ip
                self.last_ip = ip
                self.changed = True
                return self._lease(ip)
        raise SubnetFull(
            f"allocate address for {owner}: subnet {self.subnet} is full"
            f" ({last - first + 1} container addresses, all leased)"
        )

    def release(self, owner: str) -> bool:
        """Forget ``owner``'s lease; False if it had none."""
        if self._leases.pop(owner, None) is None:
            return False
        self.changed = True
        return True

    def leases(self) -> dict[str, str]:
        return dict(self._leases)


class CorruptLeases(FcrunError):
    """The leases file cannot be read back; the message names it and what is wrong."""


class IPAM:
    """A persisted allocator of addresses in ``subnet``, safe across fcrun processes.

    ``name`` (the bridge's) keeps networks apart: ``leases-<name>.json`` and
    ``leases-<name>.lock`` in ``state_dir``. ``recover``: owner -> address of the leases that
    live owners hold, what a corrupt leases file is rebuilt from (see the module docstring).
    """

    def __init__(self, state_dir: str, subnet: str = DEFAULT_SUBNET, *, name: str = "default",
                 recover: Callable[[], dict[str, str]] | None = None):
        self.subnet = parse_subnet(subnet)
        if not _NAME.fullmatch(name):
            raise SpecError(f"invalid network name {name!r}: use 1-64 of [A-Za-z0-9_.-]", "name")
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, f"leases-{name}.json")
        self.lock_path = os.path.join(state_dir, f"leases-{name}.lock")
        self.recover = recover

    @contextmanager
    def locked(self) -> Iterator[LeaseTable]:
        """Hold the lock and yield the table; save it on a clean exit if it changed.

        Raises:
            KernelError: the state directory or lock file cannot be made or locked, or the
                table cannot be written.
            SpecError: the file holds leases of another subnet.

        Resource handling: the flock is on a fresh open file description, so threads of one
        process exclude each other too; do not nest ``locked()`` (it would deadlock).
        """
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KernelError.from_oserror("open lock file", self.lock_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            table = self._load()
            yield table
            if table.changed:
                self._save(table)
        finally:
            os.close(fd)  # drops the flock

    def _load(self) -> LeaseTable:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return LeaseTable(self.subnet, {})
        except OSError as exc:
            raise KernelError.from_oserror("read leases file", self.path, exc) from None
        try:
            stored = self._decode(data)
        except CorruptLeases as exc:
            return self._rebuild(exc)
        if stored.leases and stored.subnet != str(self.subnet):
            raise SpecError(
                f"network in {self.path} uses subnet {stored.subnet} and has {len(stored.leases)}"
                f" leases; it cannot switch to {self.subnet} until they are released",
                "subnet",
            )
        last_ip = stored.last_ip if stored.subnet == str(self.subnet) else None
        return LeaseTable(self.subnet, stored.leases, last_ip)

    def _decode(self, data: bytes) -> LeaseFile:
        """Raises CorruptLeases: not JSON, torn, wrong types, or addresses that cannot be
        leases (not IPv4, outside its subnet, the network, gateway or broadcast, leased twice)."""
        def corrupt(what: str) -> CorruptLeases:
            return CorruptLeases(f"leases file {self.path} is corrupt: {what}")

        try:
            stored = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise corrupt("empty file" if not data else str(exc)) from None
        try:
            subnet = ipaddress.IPv4Network(stored.subnet, strict=True)
        except ValueError as exc:
            raise corrupt(f"subnet {stored.subnet!r}: {exc}") from None
        usable = range(int(subnet.network_address) + 2, int(subnet.broadcast_address))
        seen: dict[str, str] = {}
        for owner, ip in [*stored.leases.items(), *([("last_ip", stored.last_ip)] if stored.last_ip else [])]:
            try:
                address = int(ipaddress.IPv4Address(ip))
            except ValueError:
                raise corrupt(f"{owner}: {ip!r} is not an IPv4 address") from None
            if address not in usable:
                raise corrupt(f"{owner}: {ip} is not a container address of {subnet}")
            if owner != "last_ip":
                if ip in seen:
                    raise corrupt(f"{ip} is leased to both {seen[ip]} and {owner}")
                seen[ip] = owner
        return stored

    def _rebuild(self, problem: CorruptLeases) -> LeaseTable:
        """Move the corrupt file aside; the table of what live owners hold (or an empty one)."""
        try:
            moved = quarantine(self.path)
        except OSError as exc:
            raise KernelError.from_oserror("move aside corrupt leases file", self.path, exc) from None
        leases: dict[str, str] = {}
        if self.recover is not None:
            usable = range(int(self.subnet.network_address) + 2, int(self.subnet.broadcast_address))
            for owner, ip in sorted(self.recover().items()):
                try:
                    ok = int(ipaddress.IPv4Address(ip)) in usable
                except ValueError:
                    ok = False
                if ok and ip not in leases.values():
                    leases[owner] = ip
                else:
                    log.warning("rebuild %s: %s's address %s is unusable or taken; not leased", self.path, owner, ip)
            outcome = f"rebuilt {len(leases)} leases from the containers' states"
        else:
            outcome = "starting with no leases (nothing to rebuild them from)"
        log.warning("%s; moved to %s, %s", problem, moved, outcome)
        last_ip = str(max(ipaddress.IPv4Address(ip) for ip in leases.values())) if leases else None
        table = LeaseTable(self.subnet, leases, last_ip)
        table.changed = True  # written back at once, so the rebuild happens once
        return table

    def _save(self, table: LeaseTable) -> None:
        stored = LeaseFile(subnet=str(self.subnet), leases=table.leases(), last_ip=table.last_ip)
        write_atomic(self.path, _encoder.encode(stored), what="leases file")

    def remove_stale_temps(self) -> list[str]:
        """Delete what writes killed mid-way left; returns the paths. Call it inside
        `locked()`, so no write is in progress."""
        return remove_stale_temps(self.state_dir, os.path.basename(self.path))

    def allocate(self, owner: str) -> AddressLease:
        """A lease for ``owner`` (its existing one if it has one).

        Raises:
            SubnetFull: no address left.
        """
        with self.locked() as table:
            return table.allocate(owner)

    def release(self, owner: str) -> None:
        """Give ``owner``'s address back; an owner without a lease is fine."""
        with self.locked() as table:
            table.release(owner)

    def lease(self, owner: str) -> AddressLease | None:
        with self.locked() as table:
            return table.get(owner)

    def leases(self) -> dict[str, str]:
        """owner -> ip for every lease."""
        with self.locked() as table:
            return table.leases()
