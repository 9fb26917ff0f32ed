"""The `distserve` command: one sub-command per component.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`.
Modules are imported only when their sub-command runs, so `distserve router` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distserve import __version__

# sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "etcd": ("distserve.etcd_cmd", "run an embedded etcd in the foreground and print its client URL"),
    "engine": ("distserve.engine.cli", "run the CPU reference engine (prefill, decode or hybrid)"),
    "agent": ("distserve.agent.cli", "run the etcd agent as a sidecar of an lmdeploy api_server"),
    "router": ("distserve.router.cli", "run a stateless OpenAI-compatible PD router replica"),
    "up": ("distserve.up", "start a whole local cluster (etcd, engines with agents, routers)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the chosen sub-command's module is imported (keeps start-up light).
        if name == chosen or chosen in (None, "-h", "--help"):
            module = importlib.import_module(module_name) if name == chosen else None
            if module is not None:
                module.add_arguments(sub)
                sub.set_defaults(_module=module)
    return parser


def _version() -> str:
    return f"distserve {__version__}"


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        # Ctrl-C while the sub-command's modules load (torch takes seconds) is an interruption like any other:
        # 130, not a traceback from inside an import
        args = build_parser().parse_args()
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
