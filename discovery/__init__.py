"""discovery: an asyncio etcd v3 library for service discovery (leases, watches, informers). No LLM concepts.

Public API (see docs/internals.md for the contract):
- EtcdConfig (discovery.config): endpoints, TLS, auth, timeouts; from CLI options or DISTSERVE_ETCD* env vars.
- EtcdClient (discovery.client): get/put/delete/prefix ops, create-if-absent, compare-and-swap, leases,
  cluster status; every call has a timeout; non-idempotent writes are never retried blindly.
- LeaseSession (discovery.lease): a lease kept alive on one stream that owns keys and re-puts them under a
  new lease (a new incarnation) when the old one is really gone.
- watch_prefix (discovery.watch): list-then-watch with correct resume and compaction recovery.
- Informer (discovery.informer): a live typed view of a prefix with change callbacks and a synced signal.
- VersionedRecord, MalformedRecord (discovery.record): typed JSON values with a schema version.
- EmbeddedEtcd, EmbeddedEtcdCluster (discovery.embedded): real etcd processes for tests and local clusters.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy re-exports: `import discovery.record` (used by every record module) must not pull in grpc.
_EXPORTS = {
    "EtcdConfig": "discovery.config",
    "EtcdClient": "discovery.client",
    "KeyValue": "discovery.client",
    "EtcdError": "discovery.client",
    "EtcdUnavailable": "discovery.client",
    "EtcdWriteUncertain": "discovery.client",
    "EtcdAuthError": "discovery.client",
    "LeaseNotFound": "discovery.client",
    "LeaseSession": "discovery.lease",
    "watch_prefix": "discovery.watch",
    "WatchEvent": "discovery.watch",
    "Informer": "discovery.informer",
    "VersionedRecord": "discovery.record",
    "MalformedRecord": "discovery.record",
    "EmbeddedEtcd": "discovery.embedded",
    "EmbeddedEtcdCluster": "discovery.embedded",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'discovery' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
