"""Free loopback ports for tests and tools: one, or a run of consecutive ones (multi-engine processes)."""

from __future__ import annotations

import socket

# The one implementation of "a free port for a server started later" (embedded etcd picks its ports with it too).
from discovery.ports import free_port

HOST = "127.0.0.1"


def port_free(port: int, host: str = HOST) -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port_range(count: int, host: str = HOST) -> int:
    """The first of `count` consecutive ports that are free now (a process serving `--count N` engines)."""
    return free_port(host, count)


__all__ = ["HOST", "free_port", "free_port_range", "port_free"]
