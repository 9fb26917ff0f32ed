"""Free ports for servers that another process will bind later: one, or a run of consecutive ones.

`bind(port 0)` hands out a port from the kernel's ephemeral range, the same range every outgoing connection
takes its local port from. Between handing the port out and the child process binding it, any connect() on
the machine may take it (in CI a `distserve up` decode found 49984 taken that way, one above the 49983 that
bind(0) had given); a client socket holding it, or lingering in TIME_WAIT after it, then refuses the server's
bind even with SO_REUSEADDR. So the ports handed
out here come from below the ephemeral range, which connect() never uses, checked free by a bind, and each
process walks that pool from its own starting point so two calls never return the same port. Where the
ephemeral range leaves no room below it, it falls back to the kernel's choice.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

HOST = "127.0.0.1"

_POOL_FLOOR = 10_000  # well above the registered services most machines run below it
_MIN_POOL = 2_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _pool() -> range | None:
    """The ports below the ephemeral range, or None where there are too few of them."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768 if os.name == "posix" else 49152  # Linux's default / IANA's (Windows, macOS)
    return range(_POOL_FLOOR, low) if low - _POOL_FLOOR >= _MIN_POOL else None


_lock = threading.Lock()
_next: int | None = None  # this process's cursor into the pool


def _forget_cursor() -> None:
    global _next
    _next = None


if hasattr(os, "register_at_fork"):  # a forked child walks from a start of its own, not its parent's next port
    os.register_at_fork(after_in_child=_forget_cursor)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def port_free(port: int, host: str = HOST) -> bool:
    """Whether `port` can be bound on `host` right now, by a plain bind (no SO_REUSEADDR): a port with sockets of
    an earlier server in TIME_WAIT counts as taken, so a caller that binds without the option succeeds too."""
    with socket.socket(_family(host)) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port(host: str = HOST, count: int = 1) -> int:
    """The first of `count` consecutive ports on `host` that are free now and outside the ephemeral range."""
    global _next
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    pool = _pool()
    if pool is None or count > len(pool):
        for _ in range(200):
            base = _kernel_port(host)
            if base + count <= 65536 and all(port_free(base + i, host) for i in range(1, count)):
                return base
        raise RuntimeError(f"no {count} consecutive free ports on {host}")
    with _lock:
        if _next is None:
            _next = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big")).randrange(len(pool))
        for _ in range(len(pool) // count):
            offset = _next % len(pool)
            if offset + count > len(pool):
                offset = 0
            _next = offset + count
            base = pool[offset]
            if all(port_free(base + i, host) for i in range(count)):
                return base
    raise RuntimeError(f"no {count} consecutive free ports on {host} in {pool.start}-{pool.stop - 1}")


__all__ = ["HOST", "free_port", "port_free"]
