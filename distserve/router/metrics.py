"""The router's metrics as prometheus_client metrics in a registry of its own (never the global one).

Call sites keep one small surface: label values are tuples in declaration order (`inc(labels, amount)`,
`set(value, labels)`, `observe(value, labels)`); each label set's child is looked up once and cached, so a
request costs a dict lookup and prometheus_client's own update. Gauges can be callbacks read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

# No `<name>_created` series: the router never exported them and dashboards do not use them.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class _Metric:
    """One prometheus_client metric plus a cache of its children by label tuple."""

    def __init__(self, metric) -> None:  # noqa: ANN001 - a prometheus_client Counter, Gauge or Histogram
        self.metric = metric
        self.labelnames: tuple[str, ...] = tuple(metric._labelnames)
        self._children: dict[tuple, object] = {}

    def _child(self, labels: tuple):  # noqa: ANN202
        child = self._children.get(labels)
        if child is None:
            child = self.metric.labels(*labels) if self.labelnames else self.metric
            self._children[labels] = child
        return child

    def _sample(self, suffix: str, labels: tuple) -> float:
        """A sample's current value, through prometheus_client's public collect() (tests, diagnostics)."""
        want = dict(zip(self.labelnames, map(str, labels)))
        for family in self.metric.collect():
            for sample in family.samples:
                if sample.name == family.name + suffix and sample.labels == want:
                    return sample.value
        return 0


class Counter(_Metric):
    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, labels: tuple[str, ...] = ()
    ) -> None:
        super().__init__(prometheus_client.Counter(name, help_text, labels, registry=registry))

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        self._child(labels).inc(amount)

    def get(self, labels: tuple = ()) -> float:
        return self._sample("_total", labels)


class Gauge(_Metric):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        callback: Callable[[], dict[tuple, float]] | None = None,
    ) -> None:
        super().__init__(prometheus_client.Gauge(name, help_text, labels, registry=registry))
        self.callback = callback

    def set(self, value: float, labels: tuple = ()) -> None:
        self._child(labels).set(value)

    def get(self, labels: tuple = ()) -> float:
        return self._sample("", labels)

    def replace(self, values: dict[tuple, float]) -> None:
        """Exactly these label sets, with these values (label sets not named disappear)."""
        if self.labelnames:
            self.metric.clear()
            self._children.clear()
        for labels, value in values.items():
            self.set(value, labels)

    def refresh(self) -> None:
        if self.callback is not None:
            self.replace(self.callback())


class Histogram(_Metric):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(
            prometheus_client.Histogram(name, help_text, labels, registry=registry, buckets=buckets)
        )
        self.buckets = buckets

    def observe(self, value: float, labels: tuple = ()) -> None:
        self._child(labels).observe(value)

    def count(self, labels: tuple = ()) -> int:
        return int(self._sample("_count", labels))


class RouterMetrics:
    """Every metric the router exports (see docs/router.md for their meaning)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._gauges: list[Gauge] = []

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(r, name, help_text, labels)

        def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
            self._gauges.append(Gauge(r, name, help_text, labels))
            return self._gauges[-1]

        def histogram(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(r, name, help_text, labels)

        self.requests = counter("distserve_router_requests_total",
            "Client requests answered, by route and HTTP status", ("route", "status"))
        self.latency = histogram("distserve_router_request_duration_seconds",
            "End-to-end latency of client requests", ("route",))
        self.ttft = histogram("distserve_router_ttft_seconds",
            "Time to the first byte of the answer sent to the client", ("route",))
        self.phase = histogram("distserve_router_phase_seconds",
            "Time per phase: prefill (prefill call), migration (decode call to its first byte: KV transfer "
            "plus the first step), decode (first byte to end), hybrid (whole call to a hybrid engine)", ("phase",))
        self.retries = counter("distserve_router_retries_total", "Attempts retried on another engine", ("phase",))
        self.route_waits = counter("distserve_router_route_waits_total",
            "Requests that found no routable engine and waited for one (--route-wait), by outcome",
            ("phase", "outcome"))
        self.upstream_errors = counter("distserve_router_upstream_errors_total",
            "Failed engine calls, by phase and kind", ("phase", "kind"))
        self.in_flight = gauge("distserve_router_in_flight", "Client requests in progress")
        self.engines_known = gauge("distserve_router_engines_known", "Engines in the view, by role", ("role",))
        self.engines_routable = gauge("distserve_router_engines_routable",
            "Engines taking new requests through this router, by role", ("role",))
        self.links_usable = gauge("distserve_router_links_usable", "Established prefill->decode links")
        self.links = gauge("distserve_router_links", "Prefill->decode link records in the view, by state", ("state",))
        self.links_possible = gauge("distserve_router_links_possible",
            "Prefill->decode pairs of registered engines serving a common model (a full mesh's links)")
        self.model_routable = gauge("distserve_router_model_routable",
            "1 while a registered model has a routable path through this router, else 0", ("model",))
        # Scaling signals per pool, summed from the agents' load records (any engine kind that reports load)
        pool = (
            ("pool_running", "distserve_router_pool_requests_running", "Running sequences in the pool"),
            ("pool_waiting", "distserve_router_pool_requests_waiting", "Queued requests in the pool"),
            (
            "pool_prefill_tokens",
            "distserve_router_pool_prefill_tokens_pending",
            "Prompt tokens not yet prefilled in the pool (the prefill queue)",
            ),
            (
            "pool_kv_usage",
            "distserve_router_pool_kv_usage_ratio",
            "KV blocks in use / KV blocks of the pool's engines that report them (0..1)",
            ),
        )
        for attr, name, help_text in pool:
            setattr(self, attr, gauge(name, help_text + ", by role", ("role",)))
        self.engine_changes = counter("distserve_router_engine_changes_total",
            "Engine record changes seen once the view synced: registered (a new incarnation), ready, "
            "unhealthy, draining, starting, deregistered (left while draining), lease_expired (left otherwise)",
            ("engine", "change"))
        self.view_revision = gauge("distserve_router_view_revision", "Highest etcd revision applied to the view")
        self.view_lag = gauge("distserve_router_view_lag_seconds",
            "Delay between a record's write (its updated_at) and its arrival in the view, last observed")
        self.view_synced = gauge("distserve_router_view_synced", "1 once every watched prefix was listed")
        self.breaker_open = gauge("distserve_router_breaker_open", "Engines skipped locally after refusing a connection")
        self.breaker_trips = counter("distserve_router_breaker_trips_total", "Circuit breakers opened", ("reason",))
        self.free_cache = counter("distserve_router_free_cache_total",
            "free_cache calls made to prefill engines, by result", ("result",))
        self.session_id_missing = counter("distserve_router_prefill_session_id_missing_total",
            "Prefill answers with no integer remote_session_id nor integer id (nothing can be freed safely)")
        self.client_disconnects = counter("distserve_router_client_disconnects_total",
            "Clients that went away before their answer ended", ("route",))
        self.streams = counter("distserve_router_streams_total",
            "Streamed answers (SSE) by how they ended: completed, upstream_error (the engine dropped or "
            "broke the stream), upstream_timeout (the engine went silent), client_gone, router_error",
            ("route", "outcome"))
        self.client_read_timeouts = counter("distserve_router_client_read_timeouts_total",
            "Client connections closed (408) because a request's headers or body did not arrive in time", ("phase",))
        self.config_reloads = counter("distserve_router_config_reloads_total", "Routing configurations applied from etcd")
        self.routing_config_invalid = gauge("distserve_router_routing_config_invalid",
            "1 while the stored routing config fails the schema (the router keeps its last good one)")
        self.routing_config_invalid.set(0)
        self.strategy = gauge("distserve_router_strategy", "The routing strategy in use (value 1)", ("strategy",))
        self.picks = counter("distserve_router_picks_total", "Engines picked, by phase", ("phase", "engine"))
        # kv_aware's cache index (distserve.router.kv_index): only while kv_aware is in force
        self.kv_index_keys = gauge("distserve_router_kv_index_keys",
            "Prefix keys held for an engine (bounded per engine)", ("engine",))
        self.kv_index_dropped = counter("distserve_router_kv_index_dropped_total",
            "Prefix keys dropped because an engine's map reached its bound", ("engine",))
        self.kv_index_streams = gauge("distserve_router_kv_index_streams",
            "Engine cache-event streams followed, by state (connecting, streaming, retrying)", ("state",))
        self.kv_index_reconnects = counter("distserve_router_kv_index_reconnects_total",
            "Cache-event streams reconnected, by reason (connect, stream, incarnation, error)", ("reason",))
        self.kv_index_resyncs = counter("distserve_router_kv_index_resyncs_total",
            "Cache-event stream resynchronisations: gap (missed events), snapshot (a fresh snapshot "
            "replaced the state), incarnation (a restarted engine's state dropped)", ("reason",))
        self.kv_index_synced = gauge("distserve_router_kv_index_synced", "1 once every streaming engine delivered its snapshot")
        self.kv_matched_tokens = counter("distserve_router_kv_matched_tokens_total",
            "Prompt tokens the picked engine held cached, as the index said at the pick (kv_aware)", ("phase",))
        self.kv_picks = counter("distserve_router_kv_picks_total",
            "kv_aware picks by what decided them: cache (a cached prefix), load (no match), hash "
            "(an engine without a stream, by prefix_affinity's hash)", ("phase", "basis"))

    def render(self) -> bytes:
        for metric in self._gauges:
            metric.refresh()  # callback gauges read their figures now, at scrape time
        return generate_latest(self.registry)
