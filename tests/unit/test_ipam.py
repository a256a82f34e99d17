"""IPAM: lease allocation, persistence and locking, in a temporary state directory (no root)."""

from __future__ import annotations

import json
import os
import re

import pytest

from fcrun.errors import SpecError
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


LEASE_CORRUPTIONS = {
    "empty": (b"", "empty file"),
    "garbage": (b"{not json", "malformed"),
    "torn": (b'{"subnet":"10.234.1.0/24","leases":{"a":"10.2', "truncated"),
    "wrong type": (b'{"subnet":"10.234.1.0/24","leases":{"a":5}}', r"Expected `str`, got `int`"),
    "not an address": (b'{"subnet":"10.234.1.0/24","leases":{"a":"ten"}}', "a: 'ten' is not an IPv4 address"),
    "outside the subnet": (b'{"subnet":"10.234.1.0/24","leases":{"a":"10.9.9.9"}}',
                           "a: 10.9.9.9 is not a container address of 10.234.1.0/24"),
    "the gateway": (b'{"subnet":"10.234.1.0/24","leases":{"a":"10.234.1.1"}}', "not a container address"),
    "leased twice": (b'{"subnet":"10.234.1.0/24","leases":{"a":"10.234.1.5","b":"10.234.1.5"}}',
                     "10.234.1.5 is leased to both a and b"),
    "bad subnet": (b'{"subnet":"banana","leases":{}}', "subnet 'banana'"),
}


@pytest.mark.parametrize("kind", sorted(LEASE_CORRUPTIONS))
def test_a_corrupt_leases_file_is_named_quarantined_and_rebuilt_from_the_containers(state_dir, caplog, kind):
    """Rebuilt from what live containers' states say they hold, so no live address is handed
    out again; the file is kept for the operator."""
    data, reason = LEASE_CORRUPTIONS[kind]
    ipam = IPAM(state_dir, "10.234.1.0/24", recover=lambda: {"web": "10.234.1.7", "db": "10.234.1.3"})
    os.makedirs(state_dir)
    with open(ipam.path, "wb") as f:
        f.write(data)

    lease = ipam.allocate("new")

    assert lease.ip == "10.234.1.8"  # after the highest address in use: neither 3 nor 7
    assert ipam.leases() == {"web": "10.234.1.7", "db": "10.234.1.3", "new": "10.234.1.8"}
    [record] = [r for r in caplog.records if r.name == "fcrun.network.ipam"]
    message = record.getMessage()
    assert f"leases file {ipam.path} is corrupt" in message and re.search(reason, message), message
    assert "rebuilt 2 leases from the containers' states" in message
    [moved] = [n for n in os.listdir(state_dir) if ".corrupt-" in n]
    assert moved.startswith("leases-default.json.corrupt-") and f"moved to {os.path.join(state_dir, moved)}" in message
    with open(os.path.join(state_dir, moved), "rb") as f:
        assert f.read() == data


def test_without_a_source_a_corrupt_leases_file_starts_empty_and_says_so(state_dir, caplog):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    os.makedirs(state_dir)
    with open(ipam.path, "w") as f:
        f.write("{not json")
    assert ipam.allocate("a").ip == "10.234.1.2"
    assert "starting with no leases (nothing to rebuild them from)" in caplog.text
    assert f"leases file {ipam.path} is corrupt" in caplog.text


def test_a_rebuild_skips_unusable_and_doubled_addresses(state_dir, caplog):
    ipam = IPAM(state_dir, "10.234.1.0/24",
                recover=lambda: {"a": "10.234.1.5", "b": "10.234.1.5", "c": "192.168.0.1", "d": "x"})
    os.makedirs(state_dir)
    with open(ipam.path, "w") as f:
        f.write("")
    assert ipam.leases() == {"a": "10.234.1.5"}
    for owner in ("b", "c", "d"):
        assert f"{owner}'s address" in caplog.text


def test_a_failed_save_names_the_file_and_keeps_the_old_table(state_dir, monkeypatch):
    from fcrun import atomicfile
    from fcrun.errors import KernelError

    ipam = IPAM(state_dir, "10.234.1.0/24")
    ipam.allocate("a")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, "fsync", full)
    with pytest.raises(KernelError, match=f"write leases file {ipam.path}: .*No space left on device"):
        ipam.allocate("b")
    monkeypatch.undo()
    assert ipam.leases() == {"a": "10.234.1.2"}
    assert sorted(os.listdir(state_dir)) == ["leases-default.json", "leases-default.lock"]


def test_stale_temporaries_are_removed_under_the_lock(state_dir):
    ipam = IPAM(state_dir, "10.234.1.0/24")
    ipam.allocate("a")
    stale = os.path.join(state_dir, ".leases-default.json.k1l2m3.tmp")  # a write killed mid-way
    with open(stale, "w") as f:
        f.write('{"sub')
    assert ipam.leases() == {"a": "10.234.1.2"}
    with ipam.locked():
        assert ipam.remove_stale_temps() == [stale]
    assert sorted(os.listdir(state_dir)) == ["leases-default.json", "leases-default.lock"]


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
