"""`distserve etcd`: a real etcd in the foreground for local clusters and demos.

Prints the client URL (comma-separated for 3 members) as the first line on stdout, then runs until
SIGINT/SIGTERM and stops cleanly (a temporary data dir is removed; `--data-dir` is kept); killed outright
(SIGKILL), its reaper (distserve/reaper.py) stops etcd and removes the temporary data dir. Old revisions
are compacted automatically (--auto-compaction, default periodic:10m), so a long-running one stays flat.
Production: run your own etcd 3.4.22+ or 3.5.6+ (docs/etcd-clients.md) and point --etcd at it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import signal
import subprocess
import sys

from discovery.embedded import (
    DEFAULT_AUTO_COMPACTION,
    AutoCompaction,
    EmbeddedEtcd,
    EmbeddedEtcdCluster,
    EmbeddedEtcdError,
)
from distserve.reaper import spawn_reaper


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster-size", type=int, choices=(1, 3), default=1,
                        help="1 node (default) or a 3-member cluster")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="keep data here across runs (default: a temporary dir removed on exit)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind, a loopback or private address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="client port of a single node (default: a free port)")
    parser.add_argument("--auto-compaction", default=str(DEFAULT_AUTO_COMPACTION), metavar="MODE:RETENTION",
                        help="compact old revisions: periodic:DURATION (keep that much history), "
                             "revision:COUNT (keep that many revisions) or off "
                             f"(default {DEFAULT_AUTO_COMPACTION}; see docs/deploy.md)")


def _check_host(host: str) -> str | None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return f"--host must be an IP address, got {host!r}"
    if addr.is_unspecified:
        return "--host must be a specific interface, not a wildcard (etcd advertises it to clients)"
    if not (addr.is_loopback or addr.is_private or addr.is_link_local):
        return f"--host {host} is a public address; bind etcd to a private interface"
    return None


def main(args: argparse.Namespace) -> int:
    problem = _check_host(args.host)
    if problem is None and args.port is not None and args.cluster_size != 1:
        problem = "--port applies to a single node only"
    if problem is None and args.port is not None and not 0 < args.port < 65536:
        problem = f"--port {args.port} is not a TCP port"
    compaction: AutoCompaction | None = None
    if problem is None:
        try:
            compaction = AutoCompaction.parse(args.auto_compaction)
        except ValueError as exc:
            problem = f"--{exc}"
    if problem:
        print(f"distserve etcd: {problem}", file=sys.stderr)
        return 2

    # The handler only notes the signal: it runs on the main thread between two bytecodes, so one that took a
    # lock (threading.Event.set) could interrupt the main thread holding that very lock (Event.wait) and wait on
    # it forever (seen in CI: a SIGTERMed `distserve etcd` hung). The wakeup fd ends the loop's wait at once.
    stopping: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous_fd = signal.set_wakeup_fd(wake_w)
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopping.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    server: EmbeddedEtcd | EmbeddedEtcdCluster
    reaper: subprocess.Popen | None = None
    if args.cluster_size == 1:
        server = EmbeddedEtcd(name="distserve", data_dir=args.data_dir, host=args.host, client_port=args.port,
                              auto_compaction=compaction)
    else:
        server = EmbeddedEtcdCluster(size=3, data_dir=args.data_dir, auto_compaction=compaction)
        for member in server.members:
            member.host = args.host
    try:
        try:
            server.start()
        except EmbeddedEtcdError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"distserve etcd: {lines[0] if lines else exc}: {lines[-1] if len(lines) > 1 else ''}".rstrip(": "),
                  file=sys.stderr)
            return 1
        print(server.client_url, flush=True)
        print(f"etcd ready ({args.cluster_size} member{'s' if args.cluster_size > 1 else ''}); use it with:\n"
              f"  export DISTSERVE_ETCD_ENDPOINTS={server.client_url}\nCtrl-C stops it.", file=sys.stderr, flush=True)
        members = server.members if isinstance(server, EmbeddedEtcdCluster) else [server]
        # etcd runs in its own session (a Ctrl-C reaches us, and we stop it): should this process be killed
        # outright, the reaper stops it and removes its temporary data dir
        reaper = spawn_reaper([(m.pid, m.data_dir) for m in members],
                              [m.temporary_root for m in members if m.temporary_root], grace=0.0)
        kept = "kept" if args.data_dir else "removed on exit"
        print(f"data dir: {', '.join(m.data_dir for m in members)} ({kept})", file=sys.stderr, flush=True)
        while not stopping:
            select.select([wake_r], [], [], 0.5)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            if stopping:
                break
            dead = [m for m in members if not m.alive()]
            if dead:
                print(f"distserve etcd: member {dead[0].name} exited unexpectedly; log: {dead[0].log_tail(300)!r}",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        if reaper is not None:
            reaper.kill()
            reaper.wait()
        server.stop()
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)
