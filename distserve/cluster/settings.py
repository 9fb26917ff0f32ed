"""Environment variables shared by every component (router, agent, engine, ctl, `distserve up`).

Each component reads its own variables in its own settings module; the two that name the cluster and its
engine token are defined here, once (docs/configuration.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from distserve.cluster.keys import DEFAULT_CLUSTER

ENV_CLUSTER = "DISTSERVE_CLUSTER"
ENV_CLUSTER_TOKEN = "DISTSERVE_CLUSTER_TOKEN"


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, None when unset or empty (an empty `VAR=` in a unit file means unset)."""
    value = (os.environ if environ is None else environ).get(name)
    return value if value else None


def cluster_name(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """An explicit --cluster wins, then DISTSERVE_CLUSTER, then "default" (validated by Keys)."""
    return explicit or env_value(ENV_CLUSTER, environ) or DEFAULT_CLUSTER


def cluster_token(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Bearer key engines accept from peers, routers and agents: --cluster-token, else the env var."""
    return explicit or env_value(ENV_CLUSTER_TOKEN, environ)
