"""`python -m distserve.lmdeploy_ext.serve api_server MODEL [lmdeploy serve options]`

Runs `lmdeploy serve ...` with distserve's integration installed: the staged-TCP KV migration backend
(used for links whose handshake says protocol TCP; RDMA/NVLink links keep lmdeploy's own DLSlime path),
`remote_session_id` in prefill answers, migration_request validation, and GET /distserve/ext/status.
Everything after the script name is passed to `lmdeploy serve` unchanged.
"""

from __future__ import annotations

import logging
import os
import sys

from distserve.lmdeploy_ext.install import ENV_ENABLE, UnsupportedLmdeploy, install, install_engine_side


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    logging.basicConfig(level=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        install()
    except UnsupportedLmdeploy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: lmdeploy is not installed here ({e}); pip install 'distserve[lmdeploy]'", file=sys.stderr)
        return 2
    from lmdeploy.cli.entrypoint import run

    sys.argv = ["lmdeploy", "serve", *argv]
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__" and os.environ.get(ENV_ENABLE) == "1":
    # lmdeploy's engine process (multiprocessing spawn re-imports the launcher under this name).
    logging.basicConfig(level=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_engine_side()
