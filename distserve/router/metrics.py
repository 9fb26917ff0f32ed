"""Prometheus text exposition, hand-rolled: a few list appends per request, nothing else on the hot path.

Label values are tuples in declaration order. Gauges can be callbacks read at scrape time. The hot path records
with `Counter.add(labels)` and `Histogram.observer(labels)(value)`: a list append each, no Python call, counted in
C (collections.Counter, map over bisect) when the metric is read and by `RouterMetrics.fold()` once a second,
which bounds the pending lists. Seven such records per non-streamed request were 6 % of the router's bytecodes
(docs/benchmarks.md, "Nineteenth pass").
"""

from __future__ import annotations

import collections
import functools
from bisect import bisect_left
from collections.abc import Callable, Iterable

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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, labels
        self.values: dict[tuple, float] = {}
        self._ones: list[tuple] = []
        # count one of `labels` (a tuple): the hot path's increment, a list append counted in when read
        self.add: Callable[[tuple], None] = self._ones.append

    def inc(self, labels: tuple = (), amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def fold(self) -> None:
        ones = self._ones
        if ones:
            values = self.values
            for labels, n in collections.Counter(ones).items():
                values[labels] = values.get(labels, 0) + n
            ones.clear()  # in place: `add` is this list's append

    def get(self, labels: tuple = ()) -> float:
        self.fold()
        return self.values.get(labels, 0)

    def total(self) -> float:
        self.fold()
        return sum(self.values.values())

    def render(self) -> Iterable[str]:
        self.fold()
        for labels, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_fmt(v)}"


class Gauge:
    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        callback: Callable[[], dict[tuple, float]] | None = None,
    ) -> None:
        self.name, self.help, self.labelnames = name, help_text, labels
        self.values: dict[tuple, float] = {}
        self.callback = callback

    def set(self, value: float, labels: tuple = ()) -> None:
        self.values[labels] = value

    def get(self, labels: tuple = ()) -> float:
        return self.values.get(labels, 0)

    def render(self) -> Iterable[str]:
        values = self.callback() if self.callback else self.values
        for labels, v in sorted(values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_fmt(v)}"


class Histogram:
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name, self.help, self.labelnames = name, help_text, labels
        self.buckets = buckets
        self._bucket_of = functools.partial(bisect_left, buckets)
        # labels -> [per-bucket counts (non-cumulative, last is +Inf), sum, count]
        self.series: dict[tuple, list] = {}
        # labels -> values observed through observer() not counted in yet (a series appears once it has one)
        self._pending: dict[tuple, list[float]] = {}

    def _series(self, labels: tuple) -> list:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        return s

    def observe(self, value: float, labels: tuple = ()) -> None:
        s = self._series(labels)
        s[0][bisect_left(self.buckets, value)] += 1
        s[1] += value
        s[2] += 1

    def observer(self, labels: tuple = ()) -> Callable[[float], None]:
        """Observe into the series of `labels`: the hot path's, a list append per value, counted in when read
        (hold it: made once per series)."""
        return self._pending.setdefault(labels, []).append

    def fold(self) -> None:
        for labels, pending in self._pending.items():
            if pending:
                s = self._series(labels)
                counts = s[0]
                for i, n in collections.Counter(map(self._bucket_of, pending)).items():
                    counts[i] += n
                s[1] += sum(pending)
                s[2] += len(pending)
                pending.clear()  # in place: the observers append to this list

    def count(self, labels: tuple = ()) -> int:
        self.fold()
        s = self.series.get(labels)
        return s[2] if s else 0

    def render(self) -> Iterable[str]:
        self.fold()
        for labels, (counts, total, n) in sorted(self.series.items()):
            acc = 0
            for bound, c in zip((*self.buckets, float("inf")), counts):
                acc += c
                le = 'le="' + _fmt(bound) + '"'
                yield f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {acc}"
            yield f"{self.name}_sum{_labels(self.labelnames, labels)} {_fmt(total)}"
            yield f"{self.name}_count{_labels(self.labelnames, labels)} {n}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):  # noqa: ANN001 - returns what it was given
        self.metrics.append(metric)
        return metric

    def fold(self) -> None:
        """Count in what the hot path recorded since the last fold (bounds its lists between two scrapes)."""
        for m in self.metrics:
            if m.kind != "gauge":
                m.fold()

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self.metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.render())
        lines.append("")
        return "\n".join(lines).encode()


class RouterMetrics:
    """Every metric the router exports (see docs/router.md for their meaning)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Counter(
                "distserve_router_requests_total",
                "Client requests answered, by route and HTTP status",
                ("route", "status"),
            )
        )
        self.latency = r.add(
            Histogram(
                "distserve_router_request_duration_seconds",
                "End-to-end latency of client requests",
                ("route",),
            )
        )
        self.ttft = r.add(
            Histogram(
                "distserve_router_ttft_seconds",
                "Time to the first byte of the answer sent to the client",
                ("route",),
            )
        )
        self.phase = r.add(
            Histogram(
                "distserve_router_phase_seconds",
                "Time per phase: prefill (prefill call), migration (decode call to its first byte: KV transfer "
                "plus the first step), decode (first byte to end), hybrid (whole call to a hybrid engine)",
                ("phase",),
            )
        )
        self.retries = r.add(
            Counter("distserve_router_retries_total", "Attempts retried on another engine", ("phase",))
        )
        self.route_waits = r.add(
            Counter(
                "distserve_router_route_waits_total",
                "Requests that found no routable engine and waited for one (--route-wait), by outcome",
                ("phase", "outcome"),
            )
        )
        self.upstream_errors = r.add(
            Counter(
                "distserve_router_upstream_errors_total",
                "Failed engine calls, by phase and kind",
                ("phase", "kind"),
            )
        )
        self.in_flight = r.add(Gauge("distserve_router_in_flight", "Client requests in progress"))
        self.handed_over = r.add(
            Counter(
                "distserve_router_connections_handed_over_total",
                "Client connections the fast path handed to aiohttp's server, by reason (route: another "
                "route or method; framing: chunked or compressed body, HTTP/1.0, an odd header; head_too_large)",
                ("reason",),
            )
        )
        self.engines_known = r.add(
            Gauge("distserve_router_engines_known", "Engines in the view, by role", ("role",))
        )
        self.engines_routable = r.add(
            Gauge(
                "distserve_router_engines_routable",
                "Engines taking new requests through this router, by role",
                ("role",),
            )
        )
        self.links_usable = r.add(Gauge("distserve_router_links_usable", "Established prefill->decode links"))
        self.links = r.add(
            Gauge("distserve_router_links", "Prefill->decode link records in the view, by state", ("state",))
        )
        self.links_possible = r.add(
            Gauge(
                "distserve_router_links_possible",
                "Prefill->decode pairs of registered engines serving a common model (a full mesh's links)",
            )
        )
        self.model_routable = r.add(
            Gauge(
                "distserve_router_model_routable",
                "1 while a registered model has a routable path through this router, else 0",
                ("model",),
            )
        )
        # Scaling signals per pool, summed from the agents' load records (any engine kind that reports load)
        pool = (
            ("pool_running", "distserve_router_pool_requests_running", "Running sequences in the pool"),
            ("pool_waiting", "distserve_router_pool_requests_waiting", "Queued requests in the pool"),
            ("pool_prefill_tokens", "distserve_router_pool_prefill_tokens_pending",
             "Prompt tokens not yet prefilled in the pool (the prefill queue)"),
            ("pool_kv_usage", "distserve_router_pool_kv_usage_ratio",
             "KV blocks in use / KV blocks of the pool's engines that report them (0..1)"),
        )
        for attr, name, help_text in pool:
            setattr(self, attr, r.add(Gauge(name, help_text + ", by role", ("role",))))
        self.engine_changes = r.add(
            Counter(
                "distserve_router_engine_changes_total",
                "Engine record changes seen once the view synced: registered (a new incarnation), ready, "
                "unhealthy, draining, starting, deregistered (left while draining), lease_expired (left otherwise)",
                ("engine", "change"),
            )
        )
        self.view_revision = r.add(
            Gauge("distserve_router_view_revision", "Highest etcd revision applied to the view")
        )
        self.view_lag = r.add(
            Gauge(
                "distserve_router_view_lag_seconds",
                "Delay between a record's write (its updated_at) and its arrival in the view, last observed",
            )
        )
        self.view_synced = r.add(
            Gauge("distserve_router_view_synced", "1 once every watched prefix was listed")
        )
        self.breaker_open = r.add(
            Gauge("distserve_router_breaker_open", "Engines skipped locally after refusing a connection")
        )
        self.breaker_trips = r.add(
            Counter("distserve_router_breaker_trips_total", "Circuit breakers opened", ("reason",))
        )
        self.free_cache = r.add(
            Counter(
                "distserve_router_free_cache_total",
                "free_cache calls made to prefill engines, by result",
                ("result",),
            )
        )
        self.session_id_missing = r.add(
            Counter(
                "distserve_router_prefill_session_id_missing_total",
                "Prefill answers with no integer remote_session_id nor integer id (nothing can be freed safely)",
            )
        )
        self.client_disconnects = r.add(
            Counter(
                "distserve_router_client_disconnects_total",
                "Clients that went away before their answer ended",
                ("route",),
            )
        )
        self.streams = r.add(
            Counter(
                "distserve_router_streams_total",
                "Streamed answers (SSE) by how they ended: completed, upstream_error (the engine dropped or "
                "broke the stream), upstream_timeout (the engine went silent), client_gone, router_error",
                ("route", "outcome"),
            )
        )
        self.client_read_timeouts = r.add(
            Counter(
                "distserve_router_client_read_timeouts_total",
                "Client connections closed (408) because a request's headers or body did not arrive in time",
                ("phase",),
            )
        )
        self.config_reloads = r.add(
            Counter("distserve_router_config_reloads_total", "Routing configurations applied from etcd")
        )
        self.routing_config_invalid = r.add(
            Gauge(
                "distserve_router_routing_config_invalid",
                "1 while the stored routing config fails the schema (the router keeps its last good one)",
            )
        )
        self.routing_config_invalid.set(0)
        self.strategy = r.add(
            Gauge("distserve_router_strategy", "The routing strategy in use (value 1)", ("strategy",))
        )
        self.picks = r.add(
            Counter("distserve_router_picks_total", "Engines picked, by phase", ("phase", "engine"))
        )
        # kv_aware's cache index (distserve.router.kv_index): only while kv_aware is in force
        self.kv_index_keys = r.add(
            Gauge("distserve_router_kv_index_keys", "Prefix keys held for an engine (bounded per engine)",
                  ("engine",))
        )
        self.kv_index_families = r.add(
            Gauge("distserve_router_kv_index_families",
                  "Prefix families (root keys cached or pending) on an engine: what new prefixes spread by",
                  ("engine",))
        )
        self.kv_index_dropped = r.add(
            Counter("distserve_router_kv_index_dropped_total",
                    "Prefix keys dropped because an engine's map reached its bound", ("engine",))
        )
        self.kv_index_streams = r.add(
            Gauge("distserve_router_kv_index_streams",
                  "Engine cache-event streams followed, by state (connecting, streaming, retrying)", ("state",))
        )
        self.kv_index_reconnects = r.add(
            Counter("distserve_router_kv_index_reconnects_total",
                    "Cache-event streams reconnected, by reason (connect, stream, incarnation, error)", ("reason",))
        )
        self.kv_index_resyncs = r.add(
            Counter("distserve_router_kv_index_resyncs_total",
                    "Cache-event stream resynchronisations: gap (missed events), snapshot (a fresh snapshot "
                    "replaced the state), incarnation (a restarted engine's state dropped)", ("reason",))
        )
        self.kv_index_synced = r.add(
            Gauge("distserve_router_kv_index_synced", "1 once every streaming engine delivered its snapshot")
        )
        self.kv_matched_tokens = r.add(
            Counter("distserve_router_kv_matched_tokens_total",
                    "Prompt tokens the picked engine held cached, as the index said at the pick (kv_aware)",
                    ("phase",))
        )
        self.kv_picks = r.add(
            Counter("distserve_router_kv_picks_total",
                    "kv_aware picks by what decided them: cache (a cached prefix), load (no match), hash "
                    "(an engine without a stream, by prefix_affinity's hash)", ("phase", "basis"))
        )

        # the hot path's observers (Histogram.observer): per phase, and per route (made on a route's first use);
        # a series still appears only once it has a value
        self.phase_observers: dict[str, Callable[[float], None]] = {
            name: self.phase.observer((name,)) for name in ("prefill", "migration", "decode", "hybrid")
        }
        self.by_route: dict[str, tuple[Callable[[float], None], Callable[[float], None]]] = {}

    def route_observers(self, path: str) -> tuple[Callable[[float], None], Callable[[float], None]]:
        """(latency, ttft) observers of a route (hot paths read `by_route` first: a dict lookup, no call)."""
        obs = self.by_route.get(path)
        if obs is None:
            obs = self.by_route[path] = (self.latency.observer((path,)), self.ttft.observer((path,)))
        return obs

    def fold(self) -> None:
        self.registry.fold()

    def render(self) -> bytes:
        return self.registry.render()
