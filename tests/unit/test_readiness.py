"""The readiness probe, on loopback: accepted, refused, and the same answer in both forms."""

from __future__ import annotations

import asyncio
import select
import socket

import pytest

from fcrun.readiness import ConnectProbe, accepting


@pytest.fixture
def listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port():
    with socket.socket() as sock:  # bound, never listening: connects are refused
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def answer(probe: ConnectProbe) -> bool:
    """The probe's outcome once its connect was answered (loopback answers at once)."""
    select.select([], [probe], [], 5.0)
    result = probe.outcome()
    assert result is not None, "loopback did not answer a connect"
    return result


def test_a_listening_port_is_accepting(listening):
    with ConnectProbe("127.0.0.1", listening) as probe:
        assert answer(probe) is True
        assert probe.outcome() is True  # settled: asked again, the same answer


def test_a_port_nobody_listens_on_is_not(closed_port):
    with ConnectProbe("127.0.0.1", closed_port) as probe:
        assert answer(probe) is False


def test_ipv6_addresses_are_probed_too():
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        sock.listen()
        with ConnectProbe("::1", sock.getsockname()[1]) as probe:
            assert answer(probe) is True


def test_the_probe_closes_its_socket(listening):
    probe = ConnectProbe("127.0.0.1", listening)
    probe.close()
    assert probe.sock.fileno() == -1


def test_the_async_form_gives_the_same_answers(listening, closed_port):
    async def both():
        return await accepting("127.0.0.1", listening), await accepting("127.0.0.1", closed_port)

    assert asyncio.run(both()) == (True, False)
