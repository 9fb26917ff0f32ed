"""Free loopback ports for tests and tools: one, or a run of consecutive ones (multi-engine processes)."""

from __future__ import annotations

# The one implementation of "a free port for a server started later" (embedded etcd picks its ports with it too).
from discovery.ports import HOST, free_port, port_free


def free_port_range(count: int, host: str = HOST) -> int:
    """The first of `count` consecutive ports that are free now (a process serving `--count N` engines)."""
    return free_port(host, count)


__all__ = ["HOST", "free_port", "free_port_range", "port_free"]
