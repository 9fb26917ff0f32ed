"""Router settings: everything `distserve router` can be told, with safe defaults, bounded by one schema.

Every environment variable the router reads is read here (docs/configuration.md documents each once).

Timeouts are per phase (seconds): a prefill that takes longer than `prefill_timeout` is abandoned (504),
a decode must send its first byte within `decode_first_byte_timeout` and then never stay silent longer
than `decode_idle_timeout`; `request_timeout` bounds a whole non-streamed request. Clients get
`header_read_timeout` to send a request's headers (from its first byte) and `body_read_timeout` to send its
body (from the end of its headers): 408 and the connection closed otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distserve.cluster.keys import DEFAULT_CLUSTER
from distserve.cluster.settings import ENV_CLUSTER, ENV_CLUSTER_TOKEN, cluster_name, cluster_token, env_value

__all__ = ["ENV_CLUSTER", "ENV_CLUSTER_TOKEN", "ENV_API_KEYS", "ENV_LOG_LEVEL", "ENV_PURE_PYTHON", "RouterSettings"]

ENV_API_KEYS = "DISTSERVE_API_KEYS"
ENV_LOG_LEVEL = "DISTSERVE_LOG_LEVEL"
ENV_PURE_PYTHON = "DISTSERVE_PURE_PYTHON"

# Bounds of the client read timeouts (seconds): above these a slow client holds a connection for minutes.
HEADER_READ_TIMEOUT_MAX = 300.0
BODY_READ_TIMEOUT_MAX = 3600.0
ROUTE_WAIT_MAX = 600.0
DRAIN_DELAY_MAX = 300.0
MAX_IN_FLIGHT_MAX = 1_000_000

# settings that must be > 0 (their option names are the field names with dashes)
_POSITIVE = (
    "connect_timeout",
    "prefill_timeout",
    "decode_first_byte_timeout",
    "decode_idle_timeout",
    "request_timeout",
    "free_cache_timeout",
    "lease_ttl",
    "breaker_probe_interval",
)


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8000
    cluster: str = DEFAULT_CLUSTER
    router_id: str | None = None  # default: <hostname>-<port>
    advertise_url: str | None = None  # default: http://<host>:<port>
    # Routing used until etcd's config/routing says otherwise.
    strategy: str = "min_expected_latency"
    # Client auth (Bearer); empty = open. Secrets: never logged, never written to etcd.
    api_keys: list[str] = Field(default_factory=list, repr=False)
    # Sent as `Authorization: Bearer <token>` on every engine call.
    cluster_token: str | None = Field(default=None, repr=False)
    # Client bodies above this many bytes get 413.
    max_body_bytes: int = 8 << 20
    # Requests in flight on this replica above which new ones get 429 (0 = unbounded).
    max_in_flight: int = 0
    # Per-phase timeouts (seconds).
    connect_timeout: float = 2.0
    prefill_timeout: float = 120.0
    decode_first_byte_timeout: float = 120.0
    decode_idle_timeout: float = 60.0
    request_timeout: float = 600.0
    header_read_timeout: float = 10.0
    body_read_timeout: float = 30.0
    free_cache_timeout: float = 5.0
    # A request that finds no routable engine waits this long for one before its 503 (engines re-registering
    # after etcd lost their leases come back within a fraction of a second); 0 = answer 503 at once.
    route_wait: float = 2.0
    # Bounded retries: total attempts per phase (1 = no retry).
    max_prefill_attempts: int = 3
    max_decode_attempts: int = 3
    # Circuit breaker: probe an engine that refused a connection this often (seconds, jittered, doubling).
    breaker_probe_interval: float = 0.5
    breaker_probe_max_interval: float = 5.0
    # The router's own lease in etcd and how often its record's counters are refreshed.
    lease_ttl: float = 10.0
    record_refresh_interval: float = 5.0
    # How long start-up waits for the first complete view before serving anyway (ready stays false).
    sync_timeout: float = 10.0
    # On SIGTERM: not ready and the record removed at once, new requests still served for `drain_delay`
    # seconds (load balancers polling readiness move clients away first), then new requests get 503 and
    # those in flight get at most `shutdown_grace` to finish.
    drain_delay: float = 0.0
    shutdown_grace: float = 10.0
    # Connection set-ups in progress per engine (a cold burst must not overflow an engine's listen backlog).
    connects_per_engine: int = 32

    @model_validator(mode="after")
    def _bounds(self) -> RouterSettings:
        # one message per bound, naming the CLI option (the CLI prints it as its one error line)
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_prefill_attempts < 1 or self.max_decode_attempts < 1:
            raise ValueError("--max-prefill-attempts and --max-decode-attempts must be >= 1")
        if not 0 < self.header_read_timeout <= HEADER_READ_TIMEOUT_MAX:
            raise ValueError(f"--header-read-timeout must be in (0, {HEADER_READ_TIMEOUT_MAX:g}] seconds")
        if not 0 < self.body_read_timeout <= BODY_READ_TIMEOUT_MAX:
            raise ValueError(f"--body-read-timeout must be in (0, {BODY_READ_TIMEOUT_MAX:g}] seconds")
        if not 0 <= self.drain_delay <= DRAIN_DELAY_MAX:
            raise ValueError(f"--drain-delay must be in 0-{DRAIN_DELAY_MAX:g} seconds")
        if not 0 <= self.route_wait <= ROUTE_WAIT_MAX:
            raise ValueError(f"--route-wait must be in 0-{ROUTE_WAIT_MAX:g} seconds")
        if self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be >= 1024")
        if not 0 <= self.max_in_flight <= MAX_IN_FLIGHT_MAX:
            raise ValueError(f"--max-in-flight must be in 0-{MAX_IN_FLIGHT_MAX} (0 = unbounded)")
        if not 0 <= self.port < 65536:
            raise ValueError("--port must be in 0-65535")
        return self

    @classmethod
    def checked(cls, **values) -> RouterSettings:
        """Build settings; a value out of bounds raises ValueError with one line naming its option."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError(_first_message(exc)) from None


def _first_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    if err["type"] == "value_error":  # ours: the message as written above
        return str(err["ctx"]["error"])
    field = ".".join(str(p) for p in err["loc"])
    return f"--{field.replace('_', '-')}: {err['msg']}"


# ---------------------------------------------------------------------------------------------- environment
# DISTSERVE_CLUSTER and DISTSERVE_CLUSTER_TOKEN are defined once in distserve.cluster.settings.
def env_cluster(env: Mapping[str, str] | None = None) -> str:
    """The default of --cluster: DISTSERVE_CLUSTER, else "default"."""
    return cluster_name(None, env)


def env_cluster_token(env: Mapping[str, str] | None = None) -> str | None:
    """The default of --cluster-token: DISTSERVE_CLUSTER_TOKEN."""
    return cluster_token(None, env)


def env_api_keys(env: Mapping[str, str] | None = None) -> list[str]:
    """DISTSERVE_API_KEYS: the default of --api-keys, comma-separated."""
    return [k.strip() for k in (env_value(ENV_API_KEYS, env) or "").split(",") if k.strip()]


def env_log_level(env: Mapping[str, str] | None = None) -> str:
    """DISTSERVE_LOG_LEVEL: the default of --log-level."""
    return env_value(ENV_LOG_LEVEL, env) or "INFO"


def env_pure_python(env: Mapping[str, str] | None = None) -> bool:
    """DISTSERVE_PURE_PYTHON: `1` runs the router's compiled parts (distserve/router/compiled.py) in Python where
    their C modules are built too (to compare, or to rule them out); `0` or unset: the C modules where built.
    ValueError for anything else."""
    raw = env_value(ENV_PURE_PYTHON, env)
    if raw is None or raw == "0":
        return False
    if raw == "1":
        return True
    raise ValueError(f"{ENV_PURE_PYTHON} must be 1 or 0, not {raw[:40]!r}")
