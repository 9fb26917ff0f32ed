"""Shared fixtures: real etcd servers (discovery.embedded) and connected clients.

- `etcd`: a fresh single-node EmbeddedEtcd per test (kill/pause/resume/restart allowed).
- `etcd_cluster3`: a fresh 3-member EmbeddedEtcdCluster per test.
- `etcd_client`: a connected discovery.client.EtcdClient on `etcd` (timeout 5 s).
- `etcd_config`: the EtcdConfig that `etcd_client` uses (for code that builds its own client or a CLI's env).
"""

from __future__ import annotations

import pytest

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.embedded import EmbeddedEtcd, EmbeddedEtcdCluster


@pytest.fixture
def etcd():
    # fsync off: much faster on shared CI disks; a SIGKILL of the process keeps what the kernel has.
    server = EmbeddedEtcd(unsafe_no_fsync=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_cluster3():
    cluster = EmbeddedEtcdCluster(size=3, unsafe_no_fsync=True).start()
    try:
        yield cluster
    finally:
        cluster.stop(graceful=False)  # SIGKILL is crash-safe for etcd and saves seconds per test


@pytest.fixture
def etcd_config(etcd) -> EtcdConfig:
    return EtcdConfig(endpoints=etcd.endpoints, timeout=5.0)


@pytest.fixture
async def etcd_client(etcd_config):
    client = EtcdClient(etcd_config)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()
