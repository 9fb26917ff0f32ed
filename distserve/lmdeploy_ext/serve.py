"""`python -m distserve.lmdeploy_ext.serve api_server MODEL [--migration-protocol P] [lmdeploy serve options]`

Runs `lmdeploy serve ...` with distserve's integration installed:
- the KV migration backend: links whose handshake says protocol TCP use distserve's staged TCP path
  over DLSlime (no RDMA needed); RDMA/NVLink links keep lmdeploy's own DLSlime path untouched;
- `remote_session_id` (the engine's internal session id) in prefill answers, so routers free the right
  session; malformed or unknown `migration_request`s rejected with HTTP 400;
- extra /distserve/engine_info fields for distserve agents (engine_kind, instance_id, migration_protocol)
  and GET /distserve/ext/status (live sessions, free KV blocks, handshakes, migration counters).

--migration-protocol auto|tcp|rdma|nvlink (default auto: rdma where DLSlime sees an RDMA NIC, else tcp)
is what the engine tells agents to use for its links (env DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL wins).
Everything else is passed to `lmdeploy serve` unchanged. Tunables: the DISTSERVE_LMDEPLOY_* environment
variables (distserve/lmdeploy_ext/settings.py, docs/configuration.md), checked before lmdeploy starts.
"""

from __future__ import annotations

import logging
import sys

from distserve.lmdeploy_ext import settings
from distserve.lmdeploy_ext.install import UnsupportedLmdeploy, install, install_engine_side


def _pop_option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise ValueError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return default


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        level = settings.load().log_level  # every DISTSERVE_* variable checked before lmdeploy starts
    except settings.SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        protocol = install(_pop_option(argv, "--migration-protocol", "auto"))
    except (UnsupportedLmdeploy, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: lmdeploy is not installed here ({e}); pip install 'distserve[lmdeploy]'", file=sys.stderr
        )
        return 2
    logging.getLogger("distserve.lmdeploy_ext").info(
        "links of this engine use migration protocol %s", protocol
    )
    from lmdeploy.cli.entrypoint import run  # noqa: PLC0415 - optional; install() checked it is there

    sys.argv = ["lmdeploy", "serve", *argv]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__" and settings.enabled():
    # lmdeploy's engine process (multiprocessing spawn re-imports the launcher under this name).
    logging.basicConfig(
        level=settings.log_level_or_default(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_engine_side()
