"""Child OS processes for tests, benches and the chaos suite, and waiting for an HTTP endpoint.

A `Proc` runs in its own process group (a kill reaches its children too), writes stdout and stderr to one
log file (per start: a restarted process does not overwrite its predecessor's log) and is killed if it is
garbage collected while running. Faults are signals: `kill()` (SIGKILL, a crash), `pause()` / `resume()`
(SIGSTOP / SIGCONT, a hung process whose sockets stay open).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from discovery.embedded import stop_and_wait, wait_stopped

# Children start here, so `python -m distserve` finds this source tree even when it is not installed.
ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """`Proc(argv, name=...)` starts at once; `start=False` defers to `start()` (which also restarts)."""

    def __init__(
        self,
        args: list[str],
        name: str = "proc",
        *,
        log_dir: str | os.PathLike[str] | None = None,
        env: dict | None = None,
        cwd: str | os.PathLike[str] | None = None,
        cpus: str | None = None,
        start: bool = True,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.cwd = str(cwd or ROOT)
        self.cpus = cpus  # taskset CPU list (taskset execs the child: the pid stays the child's)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.log_path: Path = Path(os.devnull)
        self.popen: subprocess.Popen | None = None
        self.generation = 0
        self.paused = False
        self.started = 0.0  # time.perf_counter() at the last start, for durations
        self.started_at = 0.0  # time.time() at the last start, for timelines
        if start:
            self.start()

    @classmethod
    def python(cls, module_args: list[str], name: str = "proc", **kw) -> Proc:
        """`python -m <module_args...>` with this interpreter."""
        return cls([sys.executable, "-m", *module_args], name, **kw)

    @classmethod
    def distserve(cls, args: list[str], name: str = "distserve", **kw) -> Proc:
        """`python -m distserve <args...>`."""
        return cls.python(["distserve", *args], name, **kw)

    # ------------------------------------------------------------------ lifecycle
    def _new_log(self) -> Path:
        if self.log_dir is None:
            fd, path = tempfile.mkstemp(prefix=f"distserve-{self.name}-", suffix=".log")
            os.close(fd)
            return Path(path)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if self.generation == 1 else f".{self.generation}"
        return self.log_dir / f"{self.name}{suffix}.log"

    def start(self) -> Proc:
        self.generation += 1
        self.log_path = self._new_log()
        argv = ["taskset", "-c", self.cpus, *self.args] if self.cpus and shutil.which("taskset") else self.args
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.started, self.started_at = time.perf_counter(), time.time()
        with open(self.log_path, "wb") as log:  # the child holds its own copy of the descriptor
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd,
                                          start_new_session=True)
        self.paused = False
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the process itself (not its group); SIGSTOP returns once every thread has stopped."""
        if self.alive():
            if sig == signal.SIGSTOP:
                stop_and_wait(self.popen.pid)  # type: ignore[union-attr]
            else:
                os.kill(self.popen.pid, sig)  # type: ignore[union-attr]

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process group (the process and every child it started)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code, once exited; raises subprocess.TimeoutExpired after `timeout`."""
        return self.popen.wait(timeout=timeout) if self.popen is not None else None

    def kill(self) -> None:
        """SIGKILL the process group, as a crash would; waits (up to 10 s) until it is gone."""
        self.signal_group(signal.SIGKILL)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the group; returns once every thread of the process itself has stopped."""
        self.signal_group(signal.SIGSTOP)
        if self.alive():
            wait_stopped(self.popen.pid)  # type: ignore[union-attr]
        self.paused = True

    def resume(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (resuming a paused process first), then SIGKILL after `timeout`; returns the exit code."""
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

    # ------------------------------------------------------------------ output
    def output(self) -> str:
        """Everything the current run has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]

    def logs(self) -> list[Path]:
        """Every run's log, oldest first (a log directory keeps one per start)."""
        if self.log_dir is None:
            return [self.log_path] if self.log_path.exists() else []
        paths = [self.log_dir / f"{self.name}.log"]
        paths += [self.log_dir / f"{self.name}.{g}.log" for g in range(2, self.generation + 1)]
        return [p for p in paths if p.exists()]

    def cpu_seconds(self) -> float:
        """utime + stime of the process, from /proc (Linux)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __del__(self) -> None:  # last resort: never leave a child running
        try:
            if self.alive():
                os.killpg(self.popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            pass


def answers(url: str, status: int = 200, headers: dict | None = None, timeout: float = 2.0) -> bool:
    """Whether GET url answers `status` now."""
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == status
    except urllib.error.HTTPError as exc:
        return exc.code == status
    except Exception:  # noqa: BLE001 - any connection error means "no"
        return False


def wait_http(url: str, timeout: float = 30.0, status: int = 200, headers: dict | None = None,
              proc: Proc | None = None, interval: float = 0.05) -> None:
    """Block until GET url answers `status`; raises TimeoutError with the last answer or error, or
    RuntimeError with its output tail when `proc` exits first."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.returncode}):\n{proc.tail()}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == status:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return
            last = exc.code
        except Exception as exc:  # noqa: BLE001 - any connection error means "not yet"
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


__all__ = ["ROOT", "Proc", "answers", "wait_http"]
