"""Router settings: everything `distserve router` can be told, with safe defaults.

Timeouts are per phase (seconds): a prefill that takes longer than `prefill_timeout` is abandoned (504),
a decode must send its first byte within `decode_first_byte_timeout` and then never stay silent longer
than `decode_idle_timeout`; `request_timeout` bounds a whole non-streamed request. Clients get
`header_read_timeout` to send a request's headers (from its first byte) and `body_read_timeout` to send its
body (from the end of its headers): 408 and the connection closed otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distserve.keys import DEFAULT_CLUSTER


@dataclass
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    cluster: str = DEFAULT_CLUSTER
    router_id: str | None = None  # default: <hostname>-<port>
    advertise_url: str | None = None  # default: http://<host>:<port>
    # Routing used until etcd's config/routing says otherwise.
    strategy: str = "min_expected_latency"
    # Client auth (Bearer); empty = open. Secrets: never logged, never written to etcd.
    api_keys: list[str] = field(default_factory=list)
    # Sent as `Authorization: Bearer <token>` on every engine call.
    cluster_token: str | None = None
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
    # On SIGTERM: stop taking requests, let in-flight ones finish for at most this long.
    shutdown_grace: float = 10.0
    # Connection set-ups in progress per engine (a cold burst must not overflow an engine's listen backlog).
    connects_per_engine: int = 32


# Bounds of the client read timeouts (seconds): above these a slow client holds a connection for minutes.
HEADER_READ_TIMEOUT_MAX = 300.0
BODY_READ_TIMEOUT_MAX = 3600.0
