"""Process and network helpers shared by the test suites (real processes, real ports)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, status: int = 200, headers: dict | None = None) -> None:
    """Block until GET url answers `status` (raises TimeoutError with the last error)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
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
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")


class Proc:
    """A child OS process with its output in a log file; killed on stop() or garbage collection."""

    def __init__(self, args: list[str], name: str = "proc", env: dict | None = None, cwd: str | None = None):
        self.name = name
        self.args = args
        fd, self.log_path = tempfile.mkstemp(prefix=f"distserve-{name}-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or str(REPO),
            start_new_session=True,
        )

    @classmethod
    def python(cls, module_args: list[str], name: str = "proc", env: dict | None = None) -> "Proc":
        return cls([sys.executable, "-m", *module_args], name=name, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process (and its process group), as a crash would."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def __del__(self) -> None:  # last resort: never leave a child running
        try:
            if self.alive():
                os.killpg(self.popen.pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001
            pass


def spawn_engine(role: str, port: int | None = None, *extra: str, name: str | None = None) -> tuple[Proc, str]:
    """Start a reference engine as its own OS process; returns (proc, url) once /health answers."""
    port = port or free_port()
    proc = Proc.python(
        ["distserve", "engine", "--role", role, "--host", "127.0.0.1", "--port", str(port), *extra],
        name=name or f"engine-{role}-{port}",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=60)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"engine {role} on {port} did not start:\n{proc.output()[-3000:]}") from None
    return proc, url
