"""KV migration between engines over DLSlime (TCP here; RDMA and NVLink by configuration).

`geometry` (pool layout, validation, read planning) and `manager` (per-peer endpoints, handshakes,
pulls) import no dlslime; the DLSlime transports load it only when an endpoint is created.
"""

from distserve.migration.errors import MigrationError

__all__ = ["MigrationError"]
