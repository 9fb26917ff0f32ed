"""Migration errors carry the HTTP status and code the engine answers with."""

from __future__ import annotations


class MigrationError(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid_migration_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        # DLSlime calls issued but unfinished when the error was raised: they may still write local memory.
        self.pending: list = []


class TransportUnavailable(MigrationError):
    """The configured transport cannot run on this machine (no RDMA NIC, no NVLink build, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="transport_unavailable")
