"""Child OS processes for the chaos suite: each in its own process group, its output in the run directory.

Faults are signals: SIGKILL (a crash), SIGSTOP / SIGCONT (a hung process whose sockets stay open).
Every process is stopped on `stop()`, and a paused one is resumed first so SIGTERM can reach it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.name = name
        self.args = args
        self.log_dir = log_dir
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.started_at = 0.0
        self.paused = False
        self.generation = 0
        self.log_path = log_dir / f"{name}.log"

    @classmethod
    def distserve(cls, name: str, args: list[str], log_dir: Path, env: dict | None = None) -> Process:
        return cls(name, [sys.executable, "-m", "distserve", *args], log_dir, env)

    def start(self) -> Process:
        self.generation += 1
        # one log per generation, so a restarted process does not overwrite its predecessor's story
        self.log_path = self.log_dir / (f"{self.name}.log" if self.generation == 1
                                        else f"{self.name}.{self.generation}.log")
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child from here on
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.started_at = time.time()
        self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                      start_new_session=True)
        log.close()
        self.paused = False
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _group_signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the process group, as a crash would; waits until it is gone."""
        self._group_signal(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.paused = False

    def pause(self) -> None:
        self._group_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._group_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            if self.paused:
                self.resume()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def output(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def logs(self) -> list[Path]:
        """Every generation's log, oldest first."""
        paths = [self.log_dir / f"{self.name}.log"]
        paths += [self.log_dir / f"{self.name}.{g}.log" for g in range(2, self.generation + 1)]
        return [p for p in paths if p.exists()]
