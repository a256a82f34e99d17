"""IPAM: lease allocation, persistence and locking, in a temporary state directory (no root)."""

from __future__ import annotations

import json
import os

import pytest

from fcrun.errors import FcrunError, SpecError
from fcrun.network import IPAM, AddressLease, SubnetFull, parse_subnet


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "network")


@pytest.mark.parametrize(
    "subnet",
    [
        "nonsense",
        "",
        "10.88.0.1/16",  # host bits set
        "10.88.0.0/31",  # no room for a container
        "10.88.0.0/32",
        "10.0.0.0/7",
        "fd00::/64",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/24",
    ],
)
def test_bad_subnet_is_a_spec_error(state_dir, subnet):
    with pytest.raises(SpecError) as exc_info:
        IPAM(state_dir, subnet)
    assert exc_info.value.where == "subnet"
    assert repr(subnet) in str(exc_info.value)
    assert not os.path.exists(state_dir), "bad input must change nothing"


def test_parse_subnet_accepts_a_plain_ipv4_network():
    assert str(parse_subnet("10.88.0.0/16")) == "10.88.0.0/16"
    assert parse_subnet("192.168.7.0/30").prefixlen == 30


def test_allocates_lowest_address_after_gateway_in_order(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    assert ipam.allocate("a") == AddressLease(ip="10.234.1.2", prefixlen=24, gateway="10.234.1.1")
    assert ipam.allocate("b").ip == "10.234.1.3"
    assert ipam.allocate("c").ip == "10.234.1.4"
    assert ipam.leases() == {"a": "10.234.1.2", "b": "10.234.1.3", "c": "10.234.1.4"}


def test_never_hands_out_network_gateway_or_broadcast_and_no_duplicates(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/26")
    ips = [ipam.allocate(f"c{i}").ip for i in range(61)]  # 64 - network - gateway - broadcast
    assert len(set(ips)) == 61
    assert not {"10.234.1.0", "10.234.1.1", "10.234.1.63"} & set(ips)


def test_same_owner_gets_its_existing_lease(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    first = ipam.allocate("web-1")
    ipam.allocate("web-2")
    assert ipam.allocate("web-1") == first
    assert len(ipam.leases()) == 2


def test_released_address_is_reused_only_after_the_subnet_wraps_around(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/29")  # .2 to .6
    for owner in "abcde":
        ipam.allocate(owner)
    ipam.release("b")
    ipam.release("d")
    assert ipam.lease("b") is None
    assert ipam.allocate("f").ip == "10.234.1.3", "after .6 the search wraps to the lowest free"
    assert ipam.allocate("g").ip == "10.234.1.5"
    ipam.release("a")
    ipam.release("e")
    assert [ipam.allocate(owner).ip for owner in "hi"] == ["10.234.1.6", "10.234.1.2"]


def test_a_freed_address_is_not_handed_out_next(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    ipam.allocate("a")
    ipam.release("a")
    assert ipam.allocate("b").ip == "10.234.1.3"
    assert ipam.leases() == {"b": "10.234.1.3"}


def test_release_of_unknown_owner_is_fine(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    ipam.release("nobody")
    assert ipam.leases() == {}


def test_leases_persist_across_instances(state_dir):
    IPAM(state_dir, "10.234.1.0/24").allocate("a")
    again = IPAM(state_dir, "10.234.1.0/24")
    assert again.leases() == {"a": "10.234.1.2"}
    assert again.allocate("b").ip == "10.234.1.3"
    assert not [name for name in os.listdir(state_dir) if name.endswith(".tmp")]


def test_networks_with_different_names_keep_separate_leases(state_dir):
    IPAM(state_dir, "10.234.1.0/24", name="br-a").allocate("a")
    assert IPAM(state_dir, "10.234.2.0/24", name="br-b").leases() == {}
    assert sorted(os.listdir(state_dir)) == [
        "leases-br-a.json",
        "leases-br-a.lock",
        "leases-br-b.lock",
    ]


@pytest.mark.parametrize("subnet, capacity", [("10.234.1.0/30", 1), ("10.234.1.0/29", 5)])
def test_full_subnet_raises_a_clear_error(state_dir, subnet, capacity):
    ipam = IPAM(state_dir, subnet)
    for i in range(capacity):
        ipam.allocate(f"c{i}")
    with pytest.raises(SubnetFull, match=rf"allocate address for extra: subnet {subnet} is full"):
        ipam.allocate("extra")
    assert len(ipam.leases()) == capacity
    ipam.release("c0")
    assert ipam.allocate("extra").ip == "10.234.1.2"


def test_empty_owner_is_a_spec_error(state_dir):
    with pytest.raises(SpecError):
        IPAM(state_dir, "10.234.1.0/24").allocate("")


def test_switching_subnet_with_live_leases_is_refused(state_dir):
    IPAM(state_dir, "10.234.1.0/24").allocate("a")
    with pytest.raises(SpecError, match="uses subnet 10.234.1.0/24 and has 1 leases"):
        IPAM(state_dir, "10.234.2.0/24").allocate("b")
    IPAM(state_dir, "10.234.1.0/24").release("a")
    assert IPAM(state_dir, "10.234.2.0/24").allocate("b").ip == "10.234.2.2"


def test_corrupt_leases_file_names_the_file(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    os.makedirs(state_dir)
    with open(ipam.path, "w") as f:
        f.write("{not json")
    with pytest.raises(FcrunError, match=f"read leases file {ipam.path}"):
        ipam.allocate("a")


def test_failed_block_under_the_lock_saves_nothing(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    with pytest.raises(RuntimeError):
        with ipam.locked() as table:
            table.allocate("a")
            raise RuntimeError("a later step failed")
    assert ipam.leases() == {}


def test_file_format(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24", name="fcrun0")
    ipam.allocate("web-1")
    with open(os.path.join(state_dir, "leases-fcrun0.json")) as f:
        assert json.load(f) == {
            "subnet": "10.234.1.0/24",
            "leases": {"web-1": "10.234.1.2"},
            "last_ip": "10.234.1.2",
        }


def _allocate_in_child(state_dir: str, worker: int, count: int, write_fd: int) -> None:
    """Runs in a forked child: allocate ``count`` leases, report them, never return."""
    status = 1
    try:
        ipam = IPAM(state_dir, "10.234.1.0/24")
        ips = [ipam.allocate(f"w{worker}-{i}").ip for i in range(count)]
        os.write(write_fd, ("\n".join(ips) + "\n").encode())
        status = 0
    finally:
        os._exit(status)


def test_concurrent_processes_get_unique_addresses(state_dir):
    workers, per_worker = 8, 25
    read_fd, write_fd = os.pipe()
    pids = []
    try:
        for worker in range(workers):
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _allocate_in_child(state_dir, worker, per_worker, write_fd)
            pids.append(pid)
    finally:
        os.close(write_fd)
        with os.fdopen(read_fd) as reader:
            reported = reader.read().split()
        statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert statuses == [0] * workers
    assert len(reported) == workers * per_worker
    assert len(set(reported)) == len(reported), "two processes got the same address"
    stored = IPAM(state_dir, "10.234.1.0/24").leases()
    assert sorted(stored.values()) == sorted(reported)
