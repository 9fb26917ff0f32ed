"""On a terminal: rich tables by default (no --table), and `top` redrawing live until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import time

from tests.ctl.conftest import ctl_argv, ctl_env
from tests.util import REPO


def _run_on_pty(argv: list[str], env: dict, seconds: float | None = None) -> tuple[int, str]:
    """Run with stdout/stderr on a pseudo-terminal; with `seconds`, send SIGINT (Ctrl-C) after that long."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(REPO),
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    started = time.monotonic()
    interrupted = False
    os.set_blocking(master, False)
    try:
        while True:
            if seconds is not None and not interrupted and time.monotonic() - started > seconds:
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
    rc, out = await asyncio.to_thread(_run_on_pty, ctl_argv("top", "--interval", "0.3"), env, 3.0)
    assert rc == 130, out
    assert "distserve top" in out and "P1" in out and "Traceback" not in out
    assert out.count("distserve top") >= 2  # redrawn, not printed once
