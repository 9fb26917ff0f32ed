"""`distserve router --workers N`: N router processes on one port, supervised by this one.

Python runs a router's request path on one core; a host with more cores runs more processes. Each worker
is a full replica (its own etcd client, view, engine connections and record under `routers/`, id
`<router-id>-w<i>`), listening with SO_REUSEPORT on the same host:port, so the kernel spreads incoming
connections over them. The supervisor here serves nothing: it holds the port (bound, never listening, so a
restarted worker can always bind it again and `--port 0` resolves once for all), restarts a worker that
exits with back-off (`discovery.backoff.Backoff`: a worker that ran a minute starts over at the shortest
delay), and on SIGTERM or SIGINT passes SIGTERM to every worker, which stops gracefully (not ready, record
removed, in-flight requests finished), then exits 0 once all did.

A worker is `python -m distserve.router.workers`, given its settings as JSON on stdin (secrets never reach
the command line). It dies with the supervisor (PR_SET_PDEATHSIG on Linux, SIGTERM: a graceful stop).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from discovery.backoff import Backoff
from discovery.config import EtcdConfig
from distserve.cluster.keys import sanitize_id
from distserve.router.replica import run_router
from distserve.router.settings import RouterSettings

log = logging.getLogger("distserve.router.workers")

WORKERS_MAX = 256
# how long a stopping worker gets beyond its own shutdown grace (record removal, listener and pool cleanup)
STOP_MARGIN = 15.0
POLL = 0.2  # seconds between looks at the workers (a signal wakes the supervisor at once)


def worker_id(base: str, index: int) -> str:
    """The id of worker `index` under routers/ (ids are at most 128 characters)."""
    suffix = f"-w{index}"
    return base[: 128 - len(suffix)] + suffix


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (not listen) SO_REUSEPORT sockets on every address of host:port; `port` 0 picks one free port,
    the same on every address. Held for the supervisor's lifetime: the workers bind it beside them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


@dataclass
class Worker:
    index: int
    router_id: str
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0, reset_after=60.0))
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None  # due time of a pending restart
    restarts: int = 0


class Supervisor:
    def __init__(self, settings: RouterSettings, etcd_config: EtcdConfig, workers: int, log_level: str) -> None:
        if not 1 <= workers <= WORKERS_MAX:
            raise ValueError(f"--workers must be in 1-{WORKERS_MAX}")
        self.settings = settings
        self.etcd_config = etcd_config
        self.count = workers
        self.log_level = log_level
        self.workers: list[Worker] = []
        self._stopping = False

    def _payload(self, worker: Worker) -> bytes:
        etcd = self.etcd_config.model_dump()
        if self.etcd_config.password is not None:
            etcd["password"] = self.etcd_config.password.get_secret_value()
        settings = self.settings.model_copy(update={"router_id": worker.router_id})
        return json.dumps(
            {
                "settings": settings.model_dump(),
                "etcd": etcd,
                "log_level": self.log_level,
                "parent": os.getpid(),
            }
        ).encode()

    def _start(self, worker: Worker) -> None:
        worker.restart_at = None
        worker.started = time.monotonic()
        # the options after the module name are for `ps` only (which worker of which cluster): not read
        argv = [sys.executable, "-m", "distserve.router.workers", "--cluster", self.settings.cluster,
                "--router-id", worker.router_id]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        try:
            proc.stdin.write(self._payload(worker))  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:  # it died at once: seen as an exit below
            pass
        worker.proc = proc

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            delay = w.backoff.after_run(now - w.started)
            w.restarts += 1
            log.warning(
                "router worker %s (pid %d) exited with code %s after %.1fs; restarting in %.2fs",
                w.router_id, w.proc.pid, code, now - w.started, delay,
            )
            w.proc = None
            w.restart_at = now + delay

    def run(self) -> int:
        s = self.settings
        socks = reserve_port(s.host, s.port)
        port = socks[0].getsockname()[1]
        base = sanitize_id(s.router_id or f"{socket.gethostname()}-{port}")
        self.settings = s.model_copy(update={"port": port})
        self.workers = [Worker(i, worker_id(base, i)) for i in range(self.count)]
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        previous_fd = signal.set_wakeup_fd(wake_w)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for w in self.workers:
                self._start(w)
            print(
                f"distserve router: {self.count} workers on port {port} "
                f"(ids {self.workers[0].router_id}..{self.workers[-1].router_id}, pids "
                f"{' '.join(str(w.proc.pid) for w in self.workers if w.proc)})",
                flush=True,
            )
            while not self._stopping:
                due = [w.restart_at for w in self.workers if w.restart_at is not None]
                timeout = POLL if not due else max(0.0, min(POLL, min(due) - time.monotonic()))
                select.select([wake_r], [], [], timeout)
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
                if self._stopping:
                    break
                self._reap()
                now = time.monotonic()
                for w in self.workers:
                    if w.restart_at is not None and w.restart_at <= now:
                        self._start(w)
            return self._stop_all()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            for sock in socks:
                sock.close()

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def _stop_all(self) -> int:
        """SIGTERM every worker (each stops gracefully), wait for all; SIGKILL the ones past the deadline."""
        running = [w for w in self.workers if w.proc is not None]
        log.info("stopping %d router workers", len(running))
        for w in running:
            try:
                w.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.settings.shutdown_grace + STOP_MARGIN
        ok = True
        for w in running:
            try:
                code = w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                log.error("router worker %s did not stop in time: killed", w.router_id)
                w.proc.kill()  # type: ignore[union-attr]
                w.proc.wait()  # type: ignore[union-attr]
                ok = False
                continue
            # -SIGTERM: stopped before its own handler was installed (still starting): stopped as asked
            if code not in (0, -signal.SIGTERM):
                log.error("router worker %s exited with code %s while stopping", w.router_id, code)
                ok = False
        return 0 if ok else 1


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a graceful stop) when the supervisor goes, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it went before the above took effect
        sys.exit(0)


def worker_main() -> int:
    payload = json.loads(sys.stdin.buffer.read())
    _die_with_parent(int(payload["parent"]))
    logging.basicConfig(
        level=str(payload["log_level"]).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = RouterSettings.checked(**payload["settings"])
    etcd_config = EtcdConfig(**payload["etcd"])
    return run_router(settings, etcd_config, reuse_port=True)


if __name__ == "__main__":
    sys.exit(worker_main())
