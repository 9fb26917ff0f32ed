"""The migration backend distserve gives lmdeploy's PyTorch engine.

lmdeploy picks its backend by name from a registry (`MIGRATION_BACKENDS[cache_config.migration_backend
.name]`, "DLSlime" by default) and gives it, per peer engine: p2p_initialize, register_memory_region (one
per KV cache pool), endpoint_info, p2p_connect and p2p_migrate (a batch of byte assignments, decode
side). `DistserveMigrationBackend` is registered under "DLSlime" by `distserve.lmdeploy_ext.install()`
and dispatches per link on the handshake's protocol:

- TCP (lmdeploy declares it but has no implementation): distserve's staged TCP path (staged_tcp.py);
- RDMA and NVLink: lmdeploy's own `DLSlimeMigrationManagement`, called exactly as lmdeploy's backend
  calls it, so hosts with RDMA keep lmdeploy's path untouched.

lmdeploy reads `backend.links[remote_engine_id].remote_engine_config` itself, so both kinds of link
expose it.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlparse

from distserve.lmdeploy_ext.settings import StagedTcpSettings
from distserve.lmdeploy_ext.staged_tcp import StagedTcpLink, resolve_bind_host, segments_from_lmdeploy

logger = logging.getLogger("distserve.lmdeploy_ext")


def _protocol_name(protocol: Any) -> str:
    name = getattr(protocol, "name", None)
    if name is None:  # an int on the wire
        name = {1: "TCP", 2: "RDMA", 3: "NVLINK"}.get(int(protocol), str(protocol))
    return str(name).upper()


def _current_device() -> str:
    import torch  # noqa: PLC0415 - lazy: importing this module (install, tests) must not load torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


class StagedTcpLinkAdapter:
    """A TCP link as lmdeploy's cache engine sees it."""

    def __init__(self, init_request: Any, settings: StagedTcpSettings):
        self.rank = init_request.rank
        self.local_engine_config = init_request.local_engine_config
        self.remote_engine_config = init_request.remote_engine_config
        host = resolve_bind_host(urlparse(init_request.local_engine_id).hostname, settings.host)
        self.link = StagedTcpLink(host, settings, name=f"{init_request.remote_engine_id}#{self.rank}")
        self.device = _current_device()
        logger.info(
            "distserve staged-TCP KV link to %s on %s (rank %s, %s, staging %d MiB)",
            init_request.remote_engine_id,
            host,
            self.rank,
            self.device,
            settings.staging_bytes >> 20,
        )

    def register_memory_region(self, req: Any) -> None:
        # lmdeploy passes data_ptr() (already at the storage offset) and the storage offset in elements;
        # the bytes start at data_ptr().
        if req.offset:
            logger.warning(
                "cache pool %s has storage offset %s; using data_ptr as its start", req.mr_key, req.offset
            )
        self.link.register_region(req.mr_key, req.addr, req.length, self.device)

    def endpoint_info(self) -> dict:
        return self.link.endpoint_info()

    def connect(self, conn_req: Any) -> None:
        self.link.connect(json.loads(conn_req.endpoint_info))

    async def p2p_migrate(self, assignment: Any) -> dict:
        return await self.link.migrate(segments_from_lmdeploy(assignment.batch))

    def close(self) -> None:
        self.link.close()


def make_backend_class():
    """Build the backend class against the installed lmdeploy (imported only here)."""
    from lmdeploy.pytorch.disagg.backend.base import MigrationBackendImpl  # noqa: PLC0415 - optional
    from lmdeploy.pytorch.disagg.backend.dlslime import DLSlimeMigrationManagement  # noqa: PLC0415

    class DistserveMigrationBackend(MigrationBackendImpl):
        """lmdeploy's DLSlime backend plus distserve's staged TCP for links made with protocol TCP."""

        def __init__(self):
            self.links: dict[str, Any] = {}
            self.settings = StagedTcpSettings.from_env_or_default()  # never raise in the engine

        def p2p_initialize(self, init_request):
            old = self.links.pop(init_request.remote_engine_id, None)
            if isinstance(old, StagedTcpLinkAdapter):
                old.close()  # re-initializing a pair must not leak the old sockets and buffers
            if _protocol_name(init_request.protocol) == "TCP":
                self.links[init_request.remote_engine_id] = StagedTcpLinkAdapter(init_request, self.settings)
            else:
                self.links[init_request.remote_engine_id] = DLSlimeMigrationManagement(init_request)

        def register_memory_region(self, register_mr_request):
            link = self.links[register_mr_request.remote_engine_id]
            link.register_memory_region(register_mr_request)

        def endpoint_info(self, remote_engine_id, protocol):
            link = self.links[remote_engine_id]
            if isinstance(link, StagedTcpLinkAdapter):
                return link.endpoint_info()
            return link.endpoint[protocol].endpoint_info()

        def p2p_connect(self, remote_engine_id, conn_req):
            self.links[remote_engine_id].connect(conn_req)

        async def p2p_migrate(self, assignment, async_op: bool = False):
            await self.links[assignment.remote_engine_id].p2p_migrate(assignment)

        def store(self, assignment, async_op: bool = False):
            raise NotImplementedError

        def load(self, assignment, async_op: bool = False):
            raise NotImplementedError

    return DistserveMigrationBackend
