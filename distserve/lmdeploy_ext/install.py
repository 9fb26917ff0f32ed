"""Install distserve's integration into the running lmdeploy (idempotent, per process).

Two processes matter: the api_server process (HTTP fixes, server_patches.py) and the engine process
that lmdeploy spawns for the PyTorch backend (migration backend and a status RPC). The launcher
`python -m distserve.lmdeploy_ext.serve` installs both: the engine process is started with the
`spawn` method, which re-imports the launcher module as `__mp_main__`, and that import installs the
engine side there before lmdeploy builds its engine.
"""

from __future__ import annotations

import inspect
import logging
import os
import re

from distserve.lmdeploy_ext import settings
from distserve.lmdeploy_ext.backend import make_backend_class
from distserve.lmdeploy_ext.cache_events import distserve_cache_blocks, install_trie_hooks
from distserve.lmdeploy_ext.server_patches import install_api_server_patches
from distserve.lmdeploy_ext.settings import (  # noqa: F401 - ENV_*, INSTANCE_ID re-exported (older imports)
    ENV_ENABLE,
    ENV_PROTOCOL,
    INSTANCE_ID,
    lmdeploy_version,
)
from distserve.lmdeploy_ext.staged_tcp import STATS

logger = logging.getLogger("distserve.lmdeploy_ext")

SUPPORTED_RANGE = ((0, 17), (0, 19))  # lmdeploy>=0.17,<0.19, as in pyproject's `lmdeploy` extra

_engine_installed = False
_server_installed = False


class UnsupportedLmdeploy(RuntimeError):
    pass


def check_version(version: str | None = None) -> tuple[int, int]:
    version = version or lmdeploy_version()
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise UnsupportedLmdeploy(f"cannot read lmdeploy version {version!r} (supported: >=0.17,<0.19)")
    major_minor = (int(m.group(1)), int(m.group(2)))
    low, high = SUPPORTED_RANGE
    if not low <= major_minor < high:
        raise UnsupportedLmdeploy(
            f"lmdeploy {version} is outside the supported range >=0.17,<0.19 "
            "(pip install 'distserve[lmdeploy]')"
        )
    return major_minor


def install_engine_side() -> None:
    """Register the migration backend under lmdeploy's default name and add the status RPC."""
    global _engine_installed
    if _engine_installed:
        return
    check_version()
    # lmdeploy is optional and loads torch: imported only when installing into its process.
    import lmdeploy.pytorch.disagg.backend  # noqa: F401, PLC0415 - registers lmdeploy's own backends first
    from lmdeploy.pytorch.disagg.backend.backend import MIGRATION_BACKENDS  # noqa: PLC0415

    MIGRATION_BACKENDS.register_module(name="DLSlime", force=True, module=make_backend_class())
    _add_status_rpc()
    try:
        import lmdeploy.pytorch.engine  # noqa: F401, PLC0415 - engine_conn on its own is a circular import
        from lmdeploy.pytorch.disagg.conn.engine_conn import EngineP2PConnection  # noqa: PLC0415 - optional
    except ImportError:
        pass
    else:
        if fix_unawaited_zmq_disconnect(EngineP2PConnection):
            logger.info("lmdeploy's p2p_drop_connect now closes the dropped link's ZMQ sockets (0.17 fix)")
    _engine_installed = True
    logger.info("distserve migration backend installed (pid %d)", os.getpid())


def _add_status_rpc() -> None:
    """EngineWorkerBase's public methods become the engine process's RPC methods: add one."""
    try:
        from lmdeploy.pytorch.engine.mp_engine.base_worker import EngineWorkerBase  # noqa: PLC0415 - optional
    except ImportError:
        logger.warning("lmdeploy has no EngineWorkerBase: /distserve/ext/status will lack engine figures")
        return

    def distserve_ext_status(self) -> dict:
        scheduler = self.engine.scheduler
        out = {"sessions": len(scheduler.sessions), "migration": STATS.snapshot()}
        block_manager = getattr(scheduler, "block_manager", None)
        if block_manager is not None:
            out["num_gpu_blocks"] = block_manager.num_gpu_blocks
            out["free_gpu_blocks"] = block_manager.get_num_free_gpu_blocks()
        return out

    EngineWorkerBase.distserve_ext_status = distserve_ext_status

    EngineWorkerBase.distserve_cache_blocks = distserve_cache_blocks
    if install_trie_hooks():
        logger.info("prefix-cache block events hooked into lmdeploy's BlockTrie (pid %d)", os.getpid())


def fix_unawaited_zmq_disconnect(conn_cls) -> bool:
    """lmdeploy 0.17: `p2p_drop_connect` calls `zmq_disconnect`, an `async def`, without awaiting it, so
    a dropped link's ZMQ sockets and context (two IO threads) are never closed ("coroutine ... was never
    awaited", seen on the GPU): one leak per dropped link. 0.18 made it a plain method. Here it becomes a
    plain method too, running 0.17's own body, which never awaits, to its end. True if patched; a class
    whose `zmq_disconnect` is already plain (0.18) is left as it is."""
    original = getattr(conn_cls, "zmq_disconnect", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return False

    def zmq_disconnect(self, remote_engine_id: str) -> None:
        coro = original(self, remote_engine_id)
        try:
            coro.send(None)  # no await inside: this one step runs the whole body
        except StopIteration:
            return
        coro.close()
        logger.warning(
            "lmdeploy's zmq_disconnect suspended; link %s left as lmdeploy left it", remote_engine_id
        )

    zmq_disconnect.__doc__ = "distserve: lmdeploy 0.17's zmq_disconnect run to completion (it never awaits)."
    conn_cls.zmq_disconnect = zmq_disconnect
    return True


def install_server_side() -> bool:
    global _server_installed
    if _server_installed:
        return True
    check_version()
    _server_installed = install_api_server_patches()
    return _server_installed


def resolve_protocol(choice: str) -> str:
    """`auto`: lmdeploy's RDMA path where DLSlime sees an RDMA NIC, else distserve's staged TCP."""
    choice = choice.lower()
    if choice not in ("auto", "tcp", "rdma", "nvlink"):
        raise ValueError(f"--migration-protocol must be auto, tcp, rdma or nvlink, not {choice!r}")
    if choice != "auto":
        return choice
    try:
        from dlslime import available_nic  # noqa: PLC0415 - optional dependency (distserve[lmdeploy])

        return "rdma" if available_nic() else "tcp"
    except Exception:  # noqa: BLE001 - no usable DLSlime RDMA: TCP
        return "tcp"


def install(protocol: str = "auto") -> str:
    """Both sides, and mark the environment so spawned engine processes install too."""
    resolved = resolve_protocol(settings.protocol_override() or protocol)
    settings.set_enabled_and_protocol(resolved)
    install_engine_side()
    install_server_side()
    return resolved
