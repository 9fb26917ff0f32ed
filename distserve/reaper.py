"""Children that die with their parent, and a reaper for what cannot: etcd.

`distserve up` and `distserve etcd` start their components in sessions of their own (a Ctrl-C in the terminal
reaches the command, which stops them in order). A command killed outright (SIGKILL) cannot stop anything, so:
- an engine or router child asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG, set between
  fork and exec by `die_with_parent`): it stops gracefully by itself;
- etcd cannot be asked (it is not ours to exec through Python): a reaper process is, and on that SIGTERM it
  waits a moment (the agents revoke their leases), stops each etcd still its own, removes the directories.
A normal stop kills the reaper first. Linux only (elsewhere no libc is found and nothing is set).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_LIBC = None

# Between fork and exec a child runs with its parent's signal handlers, which write to the parent's event loop
# wakeup fd: a Ctrl-C reaching the child while it is still in the parent's process group would count as a
# second Ctrl-C there (`distserve up`: "again to kill at once"). So the stop signals are blocked around each
# spawn; the child discards any that reached it (they were meant for its parent) and restores the defaults.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def libc():
    """The C library (for prctl), or None where there is none to ask (not Linux)."""
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent_pid: int, c_library, hold_term: bool = False) -> None:
    """Runs in the child between fork and exec (its own session by now): SIGTERM when the parent dies, even by
    SIGKILL; the stop signals back to their defaults and unblocked (see STOP_SIGNALS). `hold_term`: SIGTERM
    stays blocked through exec, pending until the program waits for it (the reaper: a parent killed while the
    reaper still starts must not end it by SIGTERM's default action; seen in a test)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    while signal.sigtimedwait(STOP_SIGNALS, 0) is not None:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS - {signal.SIGTERM} if hold_term else STOP_SIGNALS)
    if c_library is not None:
        c_library.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def reaper_command(etcds: Sequence[tuple[int, str]], remove: Sequence[str], grace: float) -> tuple[list[str], dict]:
    """The reaper's command line and spawn options (for subprocess.Popen or asyncio.create_subprocess_exec,
    inside stop_signals_held()): each etcd as (pid, its data directory), the directories to remove, and how long
    to wait after the parent's death before stopping them."""
    argv = [sys.executable, "-c", "import sys; from distserve.reaper import reap; reap(sys.argv[1:])",
            f"{grace:g}", *(f"{pid}={data_dir}" for pid, data_dir in etcds), "--", *remove]
    parent, c_library = os.getpid(), libc()
    options = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
               "start_new_session": True,
               "preexec_fn": lambda: die_with_parent(parent, c_library, hold_term=True)}
    return argv, options


def spawn_reaper(etcds: Sequence[tuple[int, str]], remove: Sequence[str], grace: float) -> subprocess.Popen:
    """Start the reaper from synchronous code (`distserve etcd`; `distserve up` starts reaper_command's on its
    loop)."""
    argv, options = reaper_command(etcds, remove, grace)
    with stop_signals_held():
        return subprocess.Popen(argv, **options)


def reap(argv: list[str]) -> None:
    """The reaper process: idle until its parent dies (SIGTERM via PR_SET_PDEATHSIG; a normal stop kills the
    reaper instead), then wait `grace` seconds, stop each etcd, remove the directories."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})
    grace, rest = float(argv[0]), argv[1:]
    cut = rest.index("--")
    etcds = [spec.split("=", 1) for spec in rest[:cut]]
    time.sleep(grace)
    for pid_text, data_dir in etcds:
        _stop_etcd(int(pid_text), data_dir)
    for path in rest[cut + 1:]:
        shutil.rmtree(path, ignore_errors=True)


def _stop_etcd(pid: int, data_dir: str) -> None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if data_dir.encode() not in cmdline:  # not our etcd: a recycled pid
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if not Path(f"/proc/{pid}").exists():
            return
