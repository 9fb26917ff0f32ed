"""On a terminal: rich tables by default (no --table), and `top` redrawing live until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

from tests.ctl.conftest import ctl_argv, ctl_env
from tests.util import REPO, wait_until_interruptible


def _run_on_pty(argv: list[str], env: dict, seconds: float | None = None,
                interrupt_when: Callable[[bytes], bool] | None = None) -> tuple[int, str]:
    """Run with stdout/stderr on a pseudo-terminal; send SIGINT (Ctrl-C) `seconds` after the start, or once
    the output so far satisfies `interrupt_when` (what a user waits to see before pressing it)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(REPO),
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    if seconds is not None:  # counted from the interpreter's handler: before it no program can handle a press
        wait_until_interruptible(proc.pid)
    started = time.monotonic()
    interrupted = False
    os.set_blocking(master, False)
    try:
        while True:
            if not interrupted and (
                    (seconds is not None and time.monotonic() - started > seconds)
                    or (interrupt_when is not None and interrupt_when(b"".join(chunks)))):
                proc.send_signal(signal.SIGINT)
                interrupted = True
            try:
                data = os.read(master, 65536)
                if not data:
                    break
                chunks.append(data)
            except BlockingIOError:
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
            except OSError:  # EIO: the child closed the terminal
                break
            if time.monotonic() - started > 60:
                proc.kill()
                raise AssertionError("no exit within 60 s")
    finally:
        os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")


async def test_tables_by_default_on_a_terminal(planter, etcd):
    await planter.small_cluster()
    env = ctl_env(etcd.endpoints, TERM="xterm")
    rc, out = await asyncio.to_thread(_run_on_pty, ctl_argv("engines"), env)
    assert rc == 0, out
    assert "┏" in out and "INCARNATION" in out and not out.lstrip().startswith("{")
    rc, out = await asyncio.to_thread(_run_on_pty, ctl_argv("--json", "engines"), env)
    assert rc == 0 and out.lstrip().startswith("{")  # --json wins on a terminal too


async def test_top_redraws_live_until_ctrl_c(planter, etcd):
    await planter.small_cluster()
    env = ctl_env(etcd.endpoints, TERM="xterm")
    # Ctrl-C once the screen has been drawn twice (as a user watching it would press it)
    rc, out = await asyncio.to_thread(_run_on_pty, ctl_argv("top", "--interval", "0.3"), env,
                                      interrupt_when=lambda so_far: so_far.count(b"distserve top") >= 2)
    assert rc == 130, out
    assert "distserve top" in out and "P1" in out and "Traceback" not in out
    assert out.count("distserve top") >= 2  # redrawn, not printed once


async def test_ctrl_c_at_any_moment_of_the_start_exits_130_without_a_traceback(planter, etcd):
    """Ctrl-C while the command still loads its modules, connects or lists: one press ends it with 130 and no
    traceback (it used to print one from inside whichever import it hit). The presses count from the interpreter's
    own SIGINT handler: before it, a press ends any program outright, which no program can change."""
    await planter.small_cluster()
    env = ctl_env(etcd.endpoints, TERM="xterm")
    for seconds in (0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.3):
        rc, out = await asyncio.to_thread(_run_on_pty, ctl_argv("top", "--interval", "0.3"), env, seconds)
        assert rc == 130 and "Traceback" not in out, (seconds, rc, out[-2000:])


def test_one_ctrl_c_ends_the_command_even_where_a_library_swallows_the_cancellation():
    """asyncio.run cancels the command once on Ctrl-C; a call that loses that cancellation (Python 3.11's
    wait_for, a gRPC call ending with its own error) used to leave `top` running. Every SIGINT, then a timer,
    cancels again until the command has ended."""
    script = textwrap.dedent("""
        import asyncio, sys
        from distserve.ctl.main import _interruptible

        async def stubborn():
            print("ready", flush=True)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                print("swallowed", flush=True)  # what a library that lost the cancellation does
            await asyncio.sleep(30)
            return 0

        try:
            sys.exit(asyncio.run(_interruptible(stubborn())))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert proc.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - sent < 3
        assert "swallowed" in proc.stdout.read()
    finally:
        proc.kill()
