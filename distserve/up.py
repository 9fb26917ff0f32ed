"""`distserve up`: a whole cluster on this machine, for trying distserve and for CI.

    distserve up [--prefill N] [--decode M] [--routers R] [--router-workers W] [--etcd ENDPOINTS] [--port BASE] [--smoke]

Every option is checked before anything starts (a bad one: one line on stderr, exit 2; the engines' and
routers' own options are checked by their own parsers). Then it starts an embedded etcd (unless endpoints
are given; with auto-compaction, so it stays flat however long it runs), N prefill and M decode reference
engines, each with its in-process agent, and R router replicas; waits until every router answers
GET /health/ready; prints where everything listens and the `distserve-ctl` command to inspect it.

While it runs it supervises: a router or engine (with its agent) that exits for any reason is reported
and restarted on the same port with the same id, after a bounded, jittered back-off that grows while it
keeps crashing and starts over once it has stayed up a while; the rest keeps serving meanwhile. Only the
embedded etcd's death, Ctrl-C or SIGTERM stops everything, in order: routers, then engines (their agents
revoke their leases), then etcd (its temporary data directory is removed). With --smoke it sends a
completion and a streamed chat completion through every router with the official `openai` client, prints
the answers and `distserve-ctl status`, stops, and exits 0, or 1 with the reason.

Every component is a separate OS process in its own process group (a Ctrl-C in the terminal reaches
only this process, which stops the others in order); each child also gets SIGTERM if this process dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from discovery import config as etcd_config
from discovery.backoff import Backoff
from discovery.config import EtcdConfig, config_error_message
from discovery.embedded import DEFAULT_AUTO_COMPACTION, AutoCompaction, EmbeddedEtcd, EmbeddedEtcdError
from discovery.ports import free_port
from distserve.agent.options import agent_config_from_args
from distserve.cluster.keys import Keys, validate_id
from distserve.reaper import die_with_parent, libc, reaper_command, stop_signals_held
from distserve.cluster.settings import ENV_CLUSTER_TOKEN, cluster_name, cluster_token, env_value
from distserve.router.settings import env_api_keys
from distserve.router.strategies import STRATEGIES
from distserve.router.workers import WORKERS_MAX

DEFAULT_BASE_PORT = 8000
LOCAL = "127.0.0.1"
ETCD_ENV_VARS = (etcd_config.ENV_ENDPOINTS, etcd_config.ENV_CA, etcd_config.ENV_CERT, etcd_config.ENV_KEY,
                 etcd_config.ENV_USER, etcd_config.ENV_PASSWORD, etcd_config.ENV_TIMEOUT)
STOP_GRACE = 15.0  # seconds a component gets after SIGTERM before its process group is killed
SMOKE_PROMPT = "The capital of France is"
SMOKE_CHAT = "Say hello to distserve."
MAX_COMPONENTS = 64  # per kind: more is no longer a local cluster
MAX_TIMEOUT = 3600.0
# Restarts: the first after ~RESTART_BASE s, doubling while a component keeps dying, at most RESTART_CAP s
# apart; one that stayed up RESTART_RESET_AFTER s counts as recovered (its next crash waits RESTART_BASE).
RESTART_BASE = 0.5
RESTART_CAP = 30.0
RESTART_RESET_AFTER = 60.0


class UpError(Exception):
    """Why the cluster could not start or the smoke test failed (one line, shown to the user)."""


# ---- options ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill engines (default 1)")
    parser.add_argument("--decode", type=int, default=1, metavar="M", help="decode engines (default 1)")
    parser.add_argument("--routers", type=int, default=2, metavar="R", help="router replicas (default 2)")
    parser.add_argument("--router-workers", type=int, default=1, metavar="W",
                        help="processes per router on its one port (`distserve router --workers`; default 1)")
    parser.add_argument("--port", type=int, default=DEFAULT_BASE_PORT, metavar="BASE",
                        help="routers listen on BASE, BASE+1, ...; the engines on the ports after them "
                             f"(default {DEFAULT_BASE_PORT}; 0: free ports picked at start)")
    parser.add_argument("--host", default=LOCAL,
                        help="interface the routers listen on (default 127.0.0.1); engines and the embedded "
                             "etcd always stay on 127.0.0.1")
    parser.add_argument("--cluster", default=cluster_name(), metavar="NAME",
                        help="cluster name in the etcd key schema (env DISTSERVE_CLUSTER; default 'default')")
    parser.add_argument("--strategy", default=None, metavar="NAME",
                        help="routing strategy given to the routers (default: the router's default)")
    parser.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                        help="client API keys the routers require (env DISTSERVE_API_KEYS, comma separated; "
                             "default: none, the routers are open on --host)")
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face checkpoint (Llama, Qwen2, Mistral) "
                        "every engine serves (default: the built-in random model; docs/reference-engine.md)")
    parser.add_argument("--model-config", metavar="FILE", help="reference engine model configuration (JSON)")
    parser.add_argument("--null", action="store_true",
                        help="null engines: no model, instant answers (the control plane only; no torch)")
    parser.add_argument("--engine-args", default="", metavar="ARGS",
                        help="extra options for every engine, one string given with '=': --engine-args='--threads 2'")
    parser.add_argument("--router-args", default="", metavar="ARGS",
                        help="extra options for every router, one string given with '=': --router-args='--max-in-flight 256'")
    parser.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                        help="how long to wait for every router to be ready (default 180)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep each component's log here (default: a temporary directory removed on exit)")
    parser.add_argument("--smoke", action="store_true",
                        help="send a completion and a streamed chat completion through every router, print "
                             "them and distserve-ctl status, stop, exit 0 (or 1 with the reason)")
    EtcdConfig.add_arguments(parser)
    parser.add_argument("--etcd-auto-compaction", default=None, metavar="MODE:RETENTION",
                        help="the embedded etcd compacts old revisions: periodic:DURATION, revision:COUNT or off "
                             "(default periodic:10m; an external etcd is configured by its operator)")
    for action in parser._actions:
        if action.dest == "etcd_endpoints":
            action.help = ("use this etcd, comma-separated client URLs (env DISTSERVE_ETCD_ENDPOINTS), instead of "
                           "starting an embedded one")


# ---- validation: everything is checked before anything starts --------------------------------------------
@dataclass
class Checked:
    """What validation parsed, for start() to use (never parsed twice)."""

    etcd_config: object | None = None  # discovery.config.EtcdConfig for an external etcd, else None
    auto_compaction: object | None = None  # discovery.embedded.AutoCompaction for the embedded etcd, or None (off)
    client_keys: list[str] = field(default_factory=list)


def _uses_external_etcd(args: argparse.Namespace) -> bool:
    return bool(args.etcd_endpoints or env_value(etcd_config.ENV_ENDPOINTS))


def _validate(args: argparse.Namespace) -> Checked:
    """Raises UpError (one line) for the first bad option."""
    checked = Checked()
    for name in ("prefill", "decode", "routers"):
        if not 1 <= getattr(args, name) <= MAX_COMPONENTS:
            raise UpError(f"--{name} must be at least 1" if getattr(args, name) < 1 else
                          f"--{name} must be at most {MAX_COMPONENTS}")
    if not 1 <= args.router_workers <= WORKERS_MAX:
        raise UpError(f"--router-workers must be in 1-{WORKERS_MAX}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT):
        raise UpError(f"--timeout must be > 0 and at most {MAX_TIMEOUT:.0f} seconds")
    total = args.prefill + args.decode + args.routers
    if args.port < 0 or args.port + total - 1 > 65535 or 0 < args.port < 1024:
        raise UpError(f"--port {args.port}: need {total} ports from BASE, within 1024-65535 (or 0 for free ports)")
    try:
        validate_id(args.cluster, "cluster name")
    except ValueError as exc:
        raise UpError(f"--cluster: {exc}") from None
    _check_host(args.host)
    if args.log_dir and Path(args.log_dir).exists() and not Path(args.log_dir).is_dir():
        raise UpError(f"--log-dir {args.log_dir}: not a directory")
    if args.model and not Path(args.model).is_dir():
        raise UpError(f"--model {args.model}: no such directory")
    if args.model_config and not Path(args.model_config).is_file():
        raise UpError(f"--model-config {args.model_config}: no such file")
    keys = list(args.api_keys or []) or env_api_keys()  # DISTSERVE_API_KEYS, read as the router reads it
    for key in keys:  # they reach the routers comma-joined in DISTSERVE_API_KEYS
        if not key or any(c.isspace() or c == "," for c in key):
            raise UpError("--api-keys: a key must be non-empty, without spaces or commas")
    checked.client_keys = keys
    if args.strategy is not None:
        if args.strategy not in STRATEGIES:
            raise UpError(f"--strategy {args.strategy!r}: unknown (choose from {', '.join(sorted(STRATEGIES))})")
    for option in ("engine_args", "router_args"):
        try:
            shlex.split(getattr(args, option))
        except ValueError as exc:
            raise UpError(f"--{option.replace('_', '-')}: {exc}") from None
    if _uses_external_etcd(args):
        if args.etcd_auto_compaction is not None:
            raise UpError("--etcd-auto-compaction applies to the embedded etcd only; an external etcd's "
                          "operator sets its compaction (docs/deploy.md)")
        try:
            checked.etcd_config = EtcdConfig.from_args(args)
        except ValueError as exc:
            raise UpError(config_error_message(exc)) from None
    else:
        given = [f"--{dest.replace('_', '-')}" for dest in ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user",
                                                           "etcd_password", "etcd_timeout")
                 if getattr(args, dest) is not None]
        if given:
            raise UpError(f"{', '.join(given)} need --etcd: the embedded etcd has no TLS or users")
        try:
            checked.auto_compaction = AutoCompaction.parse(args.etcd_auto_compaction or str(DEFAULT_AUTO_COMPACTION))
        except ValueError as exc:
            raise UpError(f"--etcd-{exc}") from None
    _check_component_options(args)
    return checked


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        # Runs before the event loop starts (main), so a blocking lookup holds up nothing else.
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UpError(f"--host {host!r}: not an IP address or a resolvable name ({exc})") from None


class _Refused(Exception):
    pass


class _CheckingParser(argparse.ArgumentParser):
    """A component's own option parser that raises where it would print its usage and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise _Refused(message)


def _check_component_options(args: argparse.Namespace) -> None:
    """Parse what each engine and router will be given with their own parsers and settings checks, so a bad
    --engine-args/--router-args fails here and not in a child's log; and refuse options that `up` itself sets
    for each process (two values for a --port would leave `up` waiting on the wrong one)."""
    # Lazy: the engine's and router's CLIs load aiohttp and grpc; `distserve up --help` must not wait for them.
    from distserve.engine import cli as engine_cli  # noqa: PLC0415
    from distserve.router import cli as router_cli  # noqa: PLC0415

    endpoints, port = "http://127.0.0.1:1", 1  # placeholders: the real ones are known only once etcd runs
    checks = (
        ("--engine-args", "distserve engine", engine_cli.add_arguments,
         _engine_argv(args, "decode", port, endpoints, "decode-0"),
         {"role": "decode", "host": LOCAL, "port": port, "etcd_endpoints": endpoints, "cluster": args.cluster,
          "engine_id": "decode-0", "count": 1}),
        ("--router-args", "distserve router", router_cli.add_arguments,
         _router_argv(args, port, endpoints, "router-0"),
         {"host": args.host, "port": port, "etcd_endpoints": endpoints, "cluster": args.cluster,
          "router_id": "router-0", "workers": args.router_workers,
          **({"strategy": args.strategy} if args.strategy else {})}),
    )
    for option, prog, add_arguments, argv, planned in checks:
        parser = _CheckingParser(prog=prog, add_help=False)
        add_arguments(parser)
        blame = option
        try:
            ns = parser.parse_args(argv)
            if prog == "distserve router":
                router_cli.settings_from_args(ns)
            else:
                agent_config_from_args(ns, engine_url=f"http://{LOCAL}:{port}", role=ns.role)
                blame = "--model" if args.model else "--model-config" if args.model_config else option
                # The engine's own check (file, JSON, schema, overrides), so `up` never drifts from it.
                engine_cli._load_model_config(ns)
        except (_Refused, ValueError, OSError, engine_cli.ConfigError) as exc:
            raise UpError(f"{blame}: {prog}: {_one_line(exc)}") from None
        overridden = sorted(k for k, v in planned.items() if getattr(ns, k) != v)
        if overridden:
            names = ", ".join("--" + ("etcd" if k == "etcd_endpoints" else k.replace("_", "-")) for k in overridden)
            raise UpError(f"{option}: {names} set by distserve up for each process; use up's own options")


def _one_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)  # a pydantic ValidationError: its reasons, not its help links
    if callable(errors):
        text = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())) or 'value'}: {e.get('msg', '')}"
                         for e in errors())
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


# ---- what each component is started with (validation parses the same argv) ------------------------------
def _engine_argv(args: argparse.Namespace, role: str, port: int, endpoints: str, engine_id: str) -> list[str]:
    """Options after `python -m distserve engine`."""
    argv = ["--role", role, "--host", LOCAL, "--port", str(port), "--etcd", endpoints, "--cluster", args.cluster,
            "--engine-id", engine_id]
    if args.model_config:
        argv += ["--model-config", args.model_config]
    if args.model:
        argv += ["--model", str(Path(args.model).resolve())]  # the engines' working directory may differ
    if args.null:
        argv.append("--null")
    return argv + shlex.split(args.engine_args)


def _router_argv(args: argparse.Namespace, port: int, endpoints: str, router_id: str) -> list[str]:
    """Options after `python -m distserve router`."""
    argv = ["--host", args.host, "--port", str(port), "--etcd", endpoints, "--cluster", args.cluster,
            "--router-id", router_id]
    if args.strategy:
        argv += ["--strategy", args.strategy]
    if args.router_workers != 1:
        argv += ["--workers", str(args.router_workers)]
    return argv + shlex.split(args.router_args)


# ---- child processes -------------------------------------------------------------------------------------
@dataclass
class Child:
    """One component in its own process group, its output in a log file."""

    name: str
    kind: str  # "prefill", "decode" or "router"
    argv: list[str]
    url: str
    log_path: Path
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    expected_exit: bool = False
    started_at: float = 0.0  # time.monotonic() of the last start

    async def start(self) -> None:
        self.started_at = time.monotonic()
        parent, c_library = os.getpid(), libc()
        with open(self.log_path, "ab") as log, stop_signals_held():  # noqa: ASYNC230 - a local log file
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=lambda: die_with_parent(parent, c_library),
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, grace: float = STOP_GRACE) -> str | None:
        """SIGTERM the group, SIGKILL it after `grace`; returns a problem, or None for a clean stop."""
        if self.proc is None:
            return None
        self.expected_exit = True
        if self.proc.returncode is not None:
            return None
        self._signal_group(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            self._signal_group(signal.SIGKILL)
            await self.proc.wait()
            return f"{self.name} did not stop within {grace:.0f} s after SIGTERM and was killed"
        finally:
            self._signal_group(signal.SIGKILL)  # anything it started and left behind in its group
        if code not in (0, -signal.SIGTERM):
            return f"{self.name} exited with code {code} on SIGTERM"
        return None

    def kill(self) -> None:
        self.expected_exit = True
        self._signal_group(signal.SIGKILL)

    def kill_leftovers(self) -> None:
        """After the leader exited: whatever it started in its process group goes too (before a restart)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"    | {line}" for line in text[-lines:]) or "    | (empty log)"


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port. SO_REUSEADDR as aiohttp (asyncio) sets it on POSIX: the
    sockets of a cluster that just stopped linger in TIME_WAIT for a minute, and they block only a bind
    without it; a port someone listens on is refused either way."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return LOCAL
    return f"[{host}]" if ":" in host else host


def _ctl_command() -> list[str]:
    sibling = Path(sys.executable).with_name("distserve-ctl")
    return [str(sibling)] if sibling.exists() else [sys.executable, "-m", "distserve.ctl.main"]


def _ctl_display() -> str:
    sibling = Path(sys.executable).with_name("distserve-ctl")
    if sibling.exists() and shutil.which("distserve-ctl") != str(sibling):
        return str(sibling)
    return "distserve-ctl"


# ---- the cluster -----------------------------------------------------------------------------------------
def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class LocalCluster:
    args: argparse.Namespace
    checked: Checked = field(default_factory=Checked)
    say: Callable[[str], None] = _say
    etcd: object | None = None  # discovery.embedded.EmbeddedEtcd when embedded
    etcd_config: object | None = None
    children: list[Child] = field(default_factory=list)
    log_dir: Path | None = None
    owns_log_dir: bool = False
    token: str = ""
    client_keys: list[str] = field(default_factory=list)
    model: str | None = None
    etcd_data_dir: str | None = None
    reaper: asyncio.subprocess.Process | None = None

    # -- start ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        args = self.args
        external = self.checked.etcd_config is not None
        ports = self._ports(args.routers + args.prefill + args.decode)  # before anything starts
        if args.log_dir:
            self.log_dir = Path(args.log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.log_dir = Path(tempfile.mkdtemp(prefix="distserve-up-"))
            self.owns_log_dir = True
        if external:
            self.etcd_config = self.checked.etcd_config
            await self._check_external_etcd()
        else:
            await self._start_embedded_etcd()
        self.token = cluster_token() or secrets.token_hex(16)
        self.client_keys = list(self.checked.client_keys)
        self._plan(external, ports)
        for child in self.children:
            await child.start()

    async def _start_embedded_etcd(self) -> None:
        # fsync off: this etcd lives in a temporary directory and dies with the cluster anyway. Compaction on:
        # agents rewrite their load records all the time, and etcd keeps every revision until compacted.
        etcd = EmbeddedEtcd(name="up", unsafe_no_fsync=True, auto_compaction=self.checked.auto_compaction)
        self.etcd = etcd
        self.etcd_data_dir = str(Path(etcd.data_dir).parent)
        try:
            await asyncio.to_thread(etcd.start)
        except EmbeddedEtcdError as exc:
            raise UpError(f"embedded etcd did not start: {str(exc).splitlines()[0]}") from None
        self.etcd_config = EtcdConfig(endpoints=etcd.endpoints)
        # If this process is killed outright (SIGKILL), the engines and routers get SIGTERM from the kernel
        # (PR_SET_PDEATHSIG); the reaper, which gets it too, then stops etcd and removes its data directory.
        doomed = [self.etcd_data_dir, *([str(self.log_dir)] if self.owns_log_dir else [])]
        argv, options = reaper_command([(etcd.pid, etcd.data_dir)], doomed, grace=3.0)
        with stop_signals_held():
            self.reaper = await asyncio.create_subprocess_exec(*argv, **options)

    async def _check_external_etcd(self) -> None:
        from discovery.client import EtcdClient  # noqa: PLC0415 - loads grpc: only with an external etcd

        try:
            async with EtcdClient(self.etcd_config) as client:
                await client.status()
        except Exception as exc:  # noqa: BLE001 - any failure to reach etcd is the user's one-line error
            raise UpError(f"etcd unreachable ({', '.join(self.etcd_config.endpoints)}): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def _ports(self, count: int) -> list[int]:
        args = self.args
        if args.port == 0:
            # Below the ephemeral range: a port from bind(0) could be taken by any connect() before its child binds it.
            return [free_port(args.host if i < args.routers else LOCAL) for i in range(count)]
        ports = list(range(args.port, args.port + count))
        for i, port in enumerate(ports):
            host = args.host if i < args.routers else LOCAL
            if not _port_free(host, port):
                raise UpError(f"port {port} on {host} is in use: choose another --port BASE, or --port 0 for free ports")
        return ports

    def _env(self, kind: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ETCD_ENV_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        cfg = self.etcd_config
        # etcd credentials travel in the environment, never on command lines (visible to ps).
        for var, value in (("DISTSERVE_ETCD_CA", cfg.ca_cert), ("DISTSERVE_ETCD_CERT", cfg.cert),
                           ("DISTSERVE_ETCD_KEY", cfg.key), ("DISTSERVE_ETCD_USER", cfg.user),
                           ("DISTSERVE_ETCD_TIMEOUT", str(cfg.timeout))):
            if value:
                env[var] = value
        if cfg.password is not None:
            env["DISTSERVE_ETCD_PASSWORD"] = cfg.password.get_secret_value()
        env[ENV_CLUSTER_TOKEN] = self.token
        env.pop("DISTSERVE_API_KEYS", None)
        env.pop("DISTSERVE_ENGINE_API_KEYS", None)
        if kind == "router" and self.client_keys:
            env["DISTSERVE_API_KEYS"] = ",".join(self.client_keys)
        if kind in ("prefill", "decode"):
            env["DISTSERVE_ENGINE_API_KEYS"] = self.token  # engines answer only token holders
        return env

    def _plan(self, external: bool, ports: list[int]) -> None:
        args = self.args
        endpoints = ",".join(self.etcd_config.endpoints)
        # Ids stay short in a private etcd; on a shared one they carry the host name so two `up`s never clash.
        prefix = f"{socket.gethostname()}-" if external else ""
        python = [sys.executable, "-m", "distserve"]
        router_ports, engine_ports = ports[:args.routers], ports[args.routers:]
        roles = ["prefill"] * args.prefill + ["decode"] * args.decode
        counters = {"prefill": 0, "decode": 0}
        for role, port in zip(roles, engine_ports):
            name = f"{role}-{counters[role]}"
            counters[role] += 1
            argv = [*python, "engine", *_engine_argv(args, role, port, endpoints, f"{prefix}{name}")]
            self._add(name, role, argv, f"http://{LOCAL}:{port}")
        for i, port in enumerate(router_ports):
            name = f"router-{i}"
            argv = [*python, "router", *_router_argv(args, port, endpoints, f"{prefix}{name}")]
            self._add(name, "router", argv, f"http://{_url_host(args.host)}:{port}")

    def _add(self, name: str, kind: str, argv: list[str], url: str) -> None:
        assert self.log_dir is not None
        self.children.append(Child(name=name, kind=kind, argv=argv, url=url, log_path=self.log_dir / f"{name}.log",
                                   env=self._env(kind)))

    @property
    def routers(self) -> list[Child]:
        return [c for c in self.children if c.kind == "router"]

    @property
    def engines(self) -> list[Child]:
        return [c for c in self.children if c.kind != "router"]

    def engine_id(self, child: Child) -> str:
        return child.argv[child.argv.index("--engine-id") + 1]

    def router_id(self, child: Child) -> str:
        return child.argv[child.argv.index("--router-id") + 1]

    # -- readiness ------------------------------------------------------------------------------------
    def client_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client_keys[0]}"} if self.client_keys else {}

    async def wait_ready(self, stop: asyncio.Event) -> float:
        """Until every router answers /health/ready 200; raises UpError naming what is missing."""
        import aiohttp  # noqa: PLC0415 - lazy: `distserve up --help` and bad options never load it

        started = time.monotonic()
        deadline = started + self.args.timeout
        pending = {c.name: c for c in self.children}
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while pending:
                if stop.is_set():
                    raise UpError("interrupted while starting")
                self.raise_if_a_child_died()
                for name, child in list(pending.items()):
                    path = "/health/ready" if child.kind == "router" else "/health"
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        async with http.get(child.url + path) as resp:
                            if resp.status == 200:
                                del pending[name]
                                self.say(f"  {name:<10} ready  {child.url}  ({time.monotonic() - started:.1f} s)")
                if not pending:
                    break
                if time.monotonic() > deadline:
                    waiting = sorted(pending)
                    first = pending[waiting[0]]
                    raise UpError(f"not ready within {self.args.timeout:.0f} s: {', '.join(waiting)}\n"
                                  f"  {self.log_note(first)}:\n{first.log_tail()}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
            self.model = await self._first_model(http)
        return time.monotonic() - started

    async def _first_model(self, http) -> str | None:
        with contextlib.suppress(Exception):
            async with http.get(self.routers[0].url + "/v1/models", headers=self.client_headers()) as resp:
                body = await resp.json()
                return body["data"][0]["id"]
        return None

    def log_note(self, child: Child) -> str:
        where = "removed on exit; --log-dir keeps logs" if self.owns_log_dir else str(child.log_path)
        return f"last lines of {child.name}'s log ({where})"

    def raise_if_a_child_died(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.returncode is not None and not child.expected_exit:
                raise UpError(f"{child.name} exited with code {child.proc.returncode}\n"
                              f"  {self.log_note(child)}:\n{child.log_tail()}")

    # -- supervision ----------------------------------------------------------------------------------
    async def supervise(self, stop: asyncio.Event) -> str | None:
        """Keep every component running until `stop` is set (Ctrl-C, SIGTERM); returns why everything must
        stop when the embedded etcd died, else None. Every task started here has ended when it returns."""
        import aiohttp  # noqa: PLC0415 - lazy: `distserve up --help` and bad options never load it

        reason: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            tasks = [asyncio.create_task(self._keep_running(child, stop, http), name=f"supervise-{child.name}")
                     for child in self.children]
            if self.etcd is not None:
                tasks.append(asyncio.create_task(self._watch_etcd(stop, reason), name="supervise-etcd"))
            try:
                await stop.wait()
            finally:
                stop.set()
                # They end by themselves at their next step once stop is set; a restart in progress is
                # never cut in half (a process spawned but not recorded would escape the stop).
                _, pending = await asyncio.wait(tasks, timeout=10.0)
                for task in pending:
                    task.cancel()
                for result in await asyncio.gather(*tasks, return_exceptions=True):
                    if isinstance(result, Exception):
                        reason.append(f"supervisor failed: {type(result).__name__}: {result}")
        return reason[0] if reason else None

    async def _keep_running(self, child: Child, stop: asyncio.Event, http) -> None:
        backoff = Backoff(base=RESTART_BASE, cap=RESTART_CAP, reset_after=RESTART_RESET_AFTER)
        while True:
            proc = child.proc
            assert proc is not None
            if not await _first(proc.wait(), stop):
                return
            code = proc.returncode
            ran_for = time.monotonic() - child.started_at
            child.kill_leftovers()
            delay = backoff.after_run(ran_for)
            self.say(f"distserve up: {child.name} exited with code {code} after {ran_for:.1f} s; "
                     f"restarting in {delay:.1f} s")
            if code != -signal.SIGKILL:  # a kill says it all; a crash's reason is in its log
                self.say(f"  {self.log_note(child)}:\n{child.log_tail(10)}")
            if not await _first(asyncio.sleep(delay), stop):
                return
            try:
                await child.start()
            except OSError as exc:  # could not even spawn it (fork failed, out of memory): try again later
                self.say(f"distserve up: could not restart {child.name}: {exc}")
                continue  # child.proc is still the exited one: the next round backs off further
            self.say(f"distserve up: restarted {child.name} (exit {code}), attempt {backoff.attempts}, "
                     f"pid {child.proc.pid}")
            await self._report_ready_again(child, stop, http)

    async def _report_ready_again(self, child: Child, stop: asyncio.Event, http) -> None:
        """Tell the user when a restarted component answers again (bounded by --timeout); gives up early if
        it exits again (the supervisor then restarts it) or everything is stopping."""
        import aiohttp  # noqa: PLC0415 - lazy: `distserve up --help` and bad options never load it

        path = "/health/ready" if child.kind == "router" else "/health"
        deadline = child.started_at + self.args.timeout
        while not stop.is_set() and child.alive:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with http.get(child.url + path) as resp:
                    if resp.status == 200:
                        self.say(f"  {child.name:<10} ready again  {child.url}  "
                                 f"({time.monotonic() - child.started_at:.1f} s after the restart)")
                        return
            if time.monotonic() > deadline:
                self.say(f"distserve up: {child.name} not ready {self.args.timeout:.0f} s after its restart "
                         f"(still running, still supervised); {self.log_note(child)}:\n{child.log_tail(10)}")
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def _watch_etcd(self, stop: asyncio.Event, reason: list[str]) -> None:
        """The embedded etcd holds the whole cluster's state: when it dies, everything stops."""
        while not stop.is_set():
            code = self.etcd.returncode
            if code is not None:
                why = f"the embedded etcd exited with code {code}; stopping everything"
                if code != -signal.SIGKILL:  # a kill says it all; a crash's reason is at the end of its log
                    lines = self.etcd.log_tail(3000).rstrip().splitlines()[1:]  # the first may be cut
                    why += "\n" + "\n".join(f"    | {line}" for line in lines[-5:])
                reason.append(why)
                stop.set()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    # -- report ---------------------------------------------------------------------------------------
    def describe(self, took: float) -> str:
        endpoints = ",".join(self.etcd_config.endpoints)
        lines = [f"distserve up: cluster '{self.args.cluster}' ready in {took:.1f} s"]
        etcd_note = "embedded, temporary data dir" if self.etcd is not None else "external"
        lines.append(f"  {'etcd':<10} {endpoints}  ({etcd_note})")
        kind = "null engine" if self.args.null else "reference engine"
        for child in self.engines:
            lines.append(f"  {child.name:<10} {child.url}  ({kind} + agent, id {self.engine_id(child)})")
        for child in self.routers:
            lines.append(f"  {child.name:<10} {child.url}  (OpenAI API: {child.url}/v1)")
        lines.append(f"  {'logs':<10} {self.log_dir}" + ("  (removed on exit; --log-dir keeps them)" if self.owns_log_dir else ""))
        ctl = f"{_ctl_display()} --etcd {endpoints} --cluster {self.args.cluster}"
        lines.append("Inspect:")
        lines.append(f"  {ctl} status        (also: engines, links, routers, top, watch)")
        model = self.model or "MODEL"
        auth = " -H 'Authorization: Bearer <key>'" if self.client_keys else ""
        lines.append("Try:")
        lines.append(f"  curl -s {self.routers[0].url}/v1/completions -H 'Content-Type: application/json'{auth} "
                     f"-d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
        return "\n".join(lines)

    # -- smoke ----------------------------------------------------------------------------------------
    async def smoke(self) -> list[str]:
        """Through every router: a completion and a streamed chat completion; returns problems."""
        try:
            import openai  # noqa: PLC0415 - optional, only for --smoke
        except ImportError:
            return ["--smoke needs the openai package (pip install openai)"]
        problems: list[str] = []
        texts: dict[str, tuple[str, str]] = {}
        for router in self.routers:
            client = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=self.client_keys[0] if self.client_keys else "none",
                                        timeout=60.0, max_retries=0)
            try:
                models = [m.id async for m in client.models.list()]
                if not models:
                    problems.append(f"{router.name}: /v1/models lists no model")
                    continue
                model = models[0]
                completion = await client.completions.create(model=model, prompt=SMOKE_PROMPT, max_tokens=16,
                                                              temperature=0)
                text = completion.choices[0].text
                if not completion.usage or completion.usage.completion_tokens < 1:
                    problems.append(f"{router.name}: the completion produced no tokens")
                self.say(f"  {router.name} completion   {SMOKE_PROMPT!r} -> {text!r} "
                         f"({completion.choices[0].finish_reason}, {completion.usage.completion_tokens if completion.usage else 0} tokens)")
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": SMOKE_CHAT}], max_tokens=16,
                    temperature=0, stream=True)
                pieces, chunks, finish = [], 0, None
                async for chunk in stream:
                    chunks += 1
                    for choice in chunk.choices:
                        pieces.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
                chat = "".join(pieces)
                if chunks == 0 or finish is None:
                    problems.append(f"{router.name}: the chat stream ended without a finish_reason ({chunks} chunks)")
                self.say(f"  {router.name} chat stream  {SMOKE_CHAT!r} -> {chat!r} ({finish}, {chunks} chunks)")
                texts[router.name] = (text, chat)
            except openai.OpenAIError as exc:
                problems.append(f"{router.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            finally:
                await client.close()
        # Greedy decoding on the same engines: every router must return the same text.
        if len(set(texts.values())) > 1:
            problems.append(f"routers disagree on greedy output: {texts}")
        return problems

    async def ctl_status(self) -> tuple[int, str]:
        argv = [*_ctl_command(), "--etcd", ",".join(self.etcd_config.endpoints), "--cluster", self.args.cluster,
                "--table", "status"]
        env = self._env("ctl")
        env["COLUMNS"] = env.get("COLUMNS", "120")
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                    env=env, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return -1, "distserve-ctl status did not answer within 30 s"
        return proc.returncode, out.decode(errors="replace")

    # -- stop -----------------------------------------------------------------------------------------
    async def stop(self) -> list[str]:
        """Routers, then engines (their agents revoke their leases), then etcd; returns problems."""
        problems: list[str] = []
        for tier in (self.routers, self.engines):
            results = await asyncio.gather(*(c.stop() for c in tier))
            problems += [p for p in results if p]
        etcd_died = self.etcd is not None and self.etcd.returncode is not None
        if self.etcd_config is not None and self.children and not etcd_died:
            problems += await self._leftover_keys()
        for child in self.children:
            if child.proc is not None and not await _group_gone(child.proc.pid):
                problems.append(f"processes of {child.name} (process group {child.proc.pid}) are still running")
        if self.reaper is not None and self.reaper.returncode is None:
            self.reaper.kill()
            await self.reaper.wait()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)
            if self.etcd_data_dir and Path(self.etcd_data_dir).exists():  # noqa: ASYNC240 - one local stat at shutdown
                problems.append(f"etcd data directory {self.etcd_data_dir} was not removed")
        if self.owns_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return problems

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()

    async def _leftover_keys(self) -> list[str]:
        """After a graceful stop every key this cluster's processes held under a lease must be gone."""
        from discovery.client import EtcdClient  # noqa: PLC0415 - loads grpc: only at the final check

        keys = Keys(self.args.cluster)
        engine_ids = {self.engine_id(c) for c in self.engines}
        router_ids = {self.router_id(c) for c in self.routers}
        try:
            async with EtcdClient(self.etcd_config) as client:
                kvs, _ = await client.get_prefix(keys.root)
        except Exception as exc:  # noqa: BLE001
            return [f"could not check etcd for leftover keys: {exc}"]
        left = []
        for kv in kvs:
            parsed = keys.parse(kv.key)
            if parsed is None:
                continue
            ours = (parsed.kind in ("engines", "load") and parsed.ids[0] in engine_ids) or \
                   (parsed.kind == "links" and set(parsed.ids) & engine_ids) or \
                   (parsed.kind == "routers" and (parsed.ids[0] in router_ids or  # workers: <id>-w<i>
                                                  parsed.ids[0].rpartition("-w")[0] in router_ids))
            if ours:
                left.append(kv.key)
        return [f"keys left in etcd after stopping (leases not revoked): {', '.join(left)}"] if left else []


async def _first(work, stop: asyncio.Event) -> bool:
    """Await `work` unless `stop` is set first (then `work` is cancelled); True when `work` finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
    return task.done() and not task.cancelled() and not stop.is_set()


async def _group_gone(pgid: int, wait: float = 2.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


# ---- entry point -----------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, checked: Checked) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = {"count": 0}
    cluster = LocalCluster(args, checked)

    def on_signal(signame: str) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            print(f"\ndistserve up: {signame}: stopping (again to kill at once)", flush=True)
            stop.set()
        else:
            cluster.kill_all()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, signal.Signals(sig).name)
    failure: str | None = None
    interrupted = False
    problems: list[str] = []
    try:
        counts = f"{args.prefill} prefill, {args.decode} decode, {args.routers} router(s)"
        print(f"distserve up: starting {counts}", flush=True)
        try:
            await cluster.start()
            took = await cluster.wait_ready(stop)
        except UpError as exc:
            interrupted = stop.is_set()
            if not interrupted:
                failure = str(exc)
        else:
            print(cluster.describe(took), flush=True)
            if args.smoke:
                print("Smoke test (openai client, every router):", flush=True)
                problems += await cluster.smoke()
                code, out = await cluster.ctl_status()
                print("distserve-ctl status:\n" + "\n".join(f"  {line}" for line in out.rstrip().splitlines()), flush=True)
                if code != 0:
                    problems.append(f"distserve-ctl status exited with code {code}")
            else:
                print("Ctrl-C stops everything. A router or engine that exits is restarted.", flush=True)
                failure = await cluster.supervise(stop)
    finally:
        problems += await cluster.stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    if failure:
        print(f"distserve up: failed: {failure}", file=sys.stderr, flush=True)
    if problems:
        print("distserve up: " + ("smoke test failed" if args.smoke else "problems while stopping") + ":",
              file=sys.stderr, flush=True)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr, flush=True)
    if failure or problems:
        return 1
    if interrupted:
        print("distserve up: interrupted before the cluster was ready; stopped cleanly", flush=True)
        return 130
    print("distserve up: " + ("smoke test passed; " if args.smoke else "") +
          "stopped cleanly (leases revoked, no process left, no data directory left)", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        checked = _validate(args)
    except UpError as exc:
        print(f"distserve up: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return asyncio.run(run(args, checked))
