"""Fixtures shared by the router suites; `farm` is each module's own (tests.router.cluster.null_farm)."""

from __future__ import annotations

import pytest

from tests.router.cluster import etcd_client


@pytest.fixture
async def etcdc(farm):
    """A connected etcd client of the module's farm."""
    async with etcd_client(farm["etcd"].endpoints) as client:
        yield client
