"""`distserve-ctl [--etcd ENDPOINTS] [--cluster C] [--json|--table] [TLS and auth options] COMMAND`.

Exit codes: 0 success; 1 a problem (unknown id, doctor findings, drain timeout); 2 etcd unreachable or
bad arguments; 130 interrupted. Errors are one line on stderr, never a traceback
(DISTSERVE_CTL_DEBUG=1 shows it).
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "distserve-ctl":
    # Ctrl-C while the modules below load (grpc, rich: a second or more on a busy machine) ends the program
    # quietly with 130, not with a traceback from inside an import; nothing needs cleaning up yet. Only when
    # this is the program: a process that imports main() (the tests) keeps its own handler.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

# gRPC's C core logs TLS handshake failures and the like straight to stderr; our errors are one line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Coroutine  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

from .context import Ctx, close_quietly, connect, describe_error  # noqa: E402
from .errors import EXIT_PROBLEM, EXIT_UNAVAILABLE, EXIT_USAGE, CtlError, UsageError  # noqa: E402
from .render import Output  # noqa: E402
from discovery.config import EtcdConfig, EtcdConfigError  # noqa: E402
from distserve.cluster.keys import Keys  # noqa: E402
from distserve.cluster.settings import cluster_name, env_value  # noqa: E402

PROG = "distserve-ctl"
# The one variable distserve-ctl reads besides the shared DISTSERVE_CLUSTER and DISTSERVE_ETCD_* ones.
ENV_DEBUG = "DISTSERVE_CTL_DEBUG"
INTERRUPT_RESEND_S = 0.5  # after Ctrl-C, how often the command is cancelled again until it has ended


def debug_enabled() -> bool:
    """DISTSERVE_CTL_DEBUG: 1, true, yes or on (any case) show tracebacks; anything else does not."""
    return (env_value(ENV_DEBUG) or "").strip().lower() in ("1", "true", "yes", "on")

# Command modules, in the order `--help` lists them; each has register(subparsers, common).
COMMAND_MODULES = (
    "distserve.ctl.status",
    "distserve.ctl.listing",
    "distserve.ctl.describe",
    "distserve.ctl.top",
    "distserve.ctl.watch",
    "distserve.ctl.flags",
    "distserve.ctl.doctor",
    "distserve.ctl.config_cmd",
    "distserve.ctl.export",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (plus exit 2), not the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global options. Repeated on every sub-command (with defaults suppressed) so they work either side."""
    before = len(parser._actions)
    EtcdConfig.add_arguments(parser)
    parser.add_argument("--cluster", default=cluster_name(),
                        help="cluster name (the <cluster> in /distserve/v1/<cluster>/; env DISTSERVE_CLUSTER)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", dest="output", action="store_const", const="json",
                      help="JSON output (the default when stdout is not a terminal)")
    mode.add_argument("--table", dest="output", action="store_const", const="table",
                      help="tables even when stdout is not a terminal")
    if suppress:
        for action in parser._actions[before:]:
            action.default = argparse.SUPPRESS
    else:
        parser.set_defaults(output="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="Inspect and steer a distserve cluster through etcd.",
        epilog="etcd endpoints and credentials also come from DISTSERVE_ETCD_* variables. Exit codes: 0 ok, "
               "1 a problem (unknown id, doctor findings, drain timeout), 2 etcd unreachable or bad arguments. "
               "See docs/operations.md.")
    _add_common(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=OneLineParser)

    def common(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        _add_common(sub, suppress=True)
        return sub

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, common)
    return parser


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """The etcd configuration and the key schema, or UsageError: checked before anything is contacted."""
    try:
        # its message names the option or variable at fault, e.g. "invalid --etcd endpoint 'htp:/x': ..."
        cfg = EtcdConfig.from_args(args)
    except EtcdConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        keys = Keys(args.cluster)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return cfg, keys


async def _run(args: argparse.Namespace, cfg: Any, keys: Any, started: float) -> int:
    from discovery.client import EtcdUnavailable  # noqa: PLC0415 - loads grpc: `--help` and usage errors never do

    out = Output(args.output)
    client = await connect(cfg, keys, started)
    ctx = Ctx(cfg=cfg, keys=keys, out=out, client=client)
    try:
        return int(await args._run(ctx, args) or 0)
    except EtcdUnavailable as exc:
        raise CtlError(f"etcd unreachable: {describe_error(exc)}", EXIT_UNAVAILABLE) from None
    finally:
        await close_quietly(client)


async def _interruptible(work: Coroutine[Any, Any, int]) -> int:
    """`work`, ended by Ctrl-C even where a library call swallows the cancellation (Python 3.11's wait_for can
    lose one, a gRPC call cancelled under it can end with its own error): asyncio.run cancels once, so a lost
    cancellation left `distserve-ctl top` running after Ctrl-C. Here every SIGINT cancels again, and so does
    a timer until the command has ended; a second Ctrl-C is never needed."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        if not task.done():
            task.cancel()
            loop.call_later(INTERRUPT_RESEND_S, on_sigint)

    # signal handlers belong to the main thread: main() run in a thread (the tests) keeps the default
    own_sigint = threading.current_thread() is threading.main_thread()
    if own_sigint:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        result = await work
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if own_sigint:
            loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    return result


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        cfg, keys = _settings(args)
        return asyncio.run(_interruptible(_run(args, cfg, keys, started)))
    except CtlError as exc:
        _fail(str(exc))
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `distserve-ctl watch | head`: the reader left; not an error.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        except OSError:
            pass
        return 0
    except Exception as exc:  # noqa: BLE001 - the promise: one line, never a traceback
        if debug_enabled():
            traceback.print_exc()
        _fail(f"internal error: {type(exc).__name__}: {describe_error(exc)}")
        return EXIT_PROBLEM


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
