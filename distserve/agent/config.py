"""What an engine agent needs to know: its engine, its identity in etcd, and its timings.

Built from `distserve agent` options (distserve.agent.cli), from `distserve engine --etcd ...` (the in-process
agent) or from code. Validation errors are one line each, so a CLI can print them as they are.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from distserve.cluster.keys import DEFAULT_CLUSTER, sanitize_id, validate_id
from distserve.cluster.records import Role, TransferProtocol

_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def normalize_url(url: str, what: str = "URL") -> str:
    """`http(s)://host:port` without a path; a bare `host:port` gets http://."""
    raw = (url or "").strip()
    if not raw:
        raise ValueError(f"empty {what}")
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{what} {url!r}: scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{what} {url!r}: expected scheme://host:port only")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} {url!r}: invalid port") from None
    if parts.hostname is None:
        raise ValueError(f"{what} {url!r}: missing host")
    host = parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    host_text = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host_text}:{port}"


def primary_address() -> str:
    """The address this host uses to reach other hosts (no packet is sent: a UDP connect picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def advertise_from(engine_url: str) -> str:
    """The URL peers should use: the engine URL, with a wildcard bind address replaced by this host's address."""
    parts = urlsplit(engine_url)
    if (parts.hostname or "") in _WILDCARD_HOSTS:
        return f"{parts.scheme}://{primary_address()}:{parts.port}"
    return engine_url


class AgentConfigError(Exception):
    """The agent cannot represent this engine as configured (a one-line message for the CLI)."""


class AgentConfig(BaseModel):
    """Settings of one engine agent. Times are seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine_url: str  # how the agent reaches its engine (may be loopback)
    role: Role
    cluster: str = DEFAULT_CLUSTER
    engine_id: str | None = None  # default: derived from the advertised host:port
    advertise_url: str | None = None  # what peers and routers use; default: engine_url (never 0.0.0.0)
    ttl: int = Field(5, ge=1, le=3600)
    cluster_token: SecretStr | None = None  # sent as `Authorization: Bearer` on every engine call

    # Transfer facts recorded for peers when the engine does not report them itself.
    protocol: TransferProtocol | None = None  # default: from the engine, else tcp (reference) / rdma (lmdeploy)
    rdma_link_type: str = "RoCE"  # IB | RoCE
    rdma_devices: list[str] = Field(default_factory=list)

    # Liveness: probe every probe_interval; unhealthy when no probe succeeded for unhealthy_after.
    probe_interval: float = Field(1.0, gt=0)
    probe_timeout: float = Field(1.0, gt=0)
    unhealthy_after: float = Field(1.5, gt=0)
    http_timeout: float = Field(5.0, gt=0)  # any other engine call

    # Links (decode side): bounded handshakes.
    handshake_concurrency: int = Field(8, ge=1, le=1024)
    handshake_timeout: float = Field(10.0, gt=0)  # per engine call of a handshake
    handshake_attempts: int = Field(5, ge=1, le=100)  # per round, then the link is recorded "failed"
    backoff_base: float = Field(0.2, gt=0)
    backoff_max: float = Field(5.0, gt=0)
    retry_failed_after: float = Field(30.0, gt=0)  # a failed pair is retried after this (jittered)
    join_jitter: float = Field(0.1, ge=0)  # spread the first handshakes of a new pair
    # How long a link outlives its prefill's record: a record that vanishes may be a lost lease (the prefill
    # agent re-registers the same engine process within moments) rather than a dead engine. None = ttl.
    link_hold: float | None = Field(None, ge=0)

    # Load and drain.
    load_interval: float = Field(0.5, gt=0)
    drain_quiet: float = Field(1.0, ge=0)  # in-flight must stay zero this long before deregistering
    drain_unknown_grace: float = Field(30.0, ge=0)  # engines without load metrics: wait this long instead
    keep_on_exit: bool = False  # graceful stop leaves the lease to expire (a replacement adopts the links)
    software_version: str | None = None  # recorded when the engine does not report its own version

    @field_validator("engine_url")
    @classmethod
    def _engine_url(cls, value: str) -> str:
        return normalize_url(value, "engine URL")

    @field_validator("advertise_url")
    @classmethod
    def _advertise_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = normalize_url(value, "advertise URL")
        if (urlsplit(url).hostname or "") in _WILDCARD_HOSTS:
            raise ValueError(f"advertise URL {value!r}: a wildcard address cannot be reached by peers")
        return url

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        return validate_id(value, "cluster name")

    @field_validator("engine_id")
    @classmethod
    def _engine_id(cls, value: str | None) -> str | None:
        return None if value is None else validate_id(value, "engine id")

    @field_validator("rdma_link_type")
    @classmethod
    def _link_type(cls, value: str) -> str:
        for name in ("IB", "RoCE"):
            if value.lower() == name.lower():
                return name
        raise ValueError(f"rdma link type {value!r}: expected IB or RoCE")

    @model_validator(mode="after")
    def _timings(self) -> "AgentConfig":
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")
        return self

    # --- derived -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The engine's URL for peers and routers, and its engine id in the lmdeploy handshake."""
        return self.advertise_url or advertise_from(self.engine_url)

    @property
    def id(self) -> str:
        if self.engine_id:
            return self.engine_id
        parts = urlsplit(self.url)
        return sanitize_id(f"{parts.hostname}-{parts.port}")

    @property
    def link_hold_s(self) -> float:
        return float(self.ttl) if self.link_hold is None else self.link_hold

    @property
    def token(self) -> str | None:
        return self.cluster_token.get_secret_value() if self.cluster_token else None

    def describe(self) -> str:
        """One line for logs (no secret)."""
        return (f"agent id={self.id} role={self.role} engine={self.engine_url} url={self.url} "
                f"cluster={self.cluster} ttl={self.ttl}s auth={'on' if self.cluster_token else 'off'}")
