"""Free loopback ports for tests and tools: one, or a run of consecutive ones (multi-engine processes)."""

from __future__ import annotations

import socket

# The one implementation of "ask the kernel for a free port" (embedded etcd picks its ports with it too).
from discovery.embedded import free_port

HOST = "127.0.0.1"


def port_free(port: int, host: str = HOST) -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port_range(count: int, host: str = HOST, attempts: int = 200) -> int:
    """The first of `count` consecutive ports that are free now (a process serving `--count N` engines)."""
    for _ in range(attempts):
        base = free_port(host)
        if base + count <= 65536 and all(port_free(base + i, host) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host} after {attempts} attempts")


__all__ = ["HOST", "free_port", "free_port_range", "port_free"]
