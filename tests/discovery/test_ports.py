"""Ports handed out for servers that start later stay clear of the ports outgoing connections take."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import discovery.ports as ports
from discovery.ports import free_port


def _ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


@pytest.mark.skipif(not Path("/proc/sys/net/ipv4/ip_local_port_range").exists(), reason="Linux only")
def test_ports_come_from_below_the_ephemeral_range_and_never_twice():
    """A port from the ephemeral range can be taken by any connect() before its server binds it (CI saw a
    `distserve up` decode refused its port that way); below the range nothing but a bind takes it."""
    low = _ephemeral_low()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(p < low for p in ports), [p for p in ports if p >= low]
    base = free_port(count=4)
    assert base + 3 < low and not {base, base + 1, base + 2, base + 3} & set(ports)
    for port in range(base, base + 4):  # each of them binds, without SO_REUSEADDR
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_skipped(monkeypatch):
    pool = ports._pool()
    if pool is None:
        pytest.skip("no room below this machine's ephemeral range")
    taken = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", taken))
        server.listen()
        monkeypatch.setattr(ports, "_next", pool.index(taken))  # the walk comes to it next
        assert free_port() != taken


def test_a_count_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        free_port(count=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_forked_child_does_not_hand_out_its_parents_next_ports():
    free_port()  # the parent's cursor is set
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next port, to the parent
        try:
            os.write(write, str(free_port()).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_port = int(os.read(read, 16))
    os.close(read)
    assert child_port not in {free_port() for _ in range(5)}  # by chance 1 in ~4,500 (the pool is ~22,768 ports)
