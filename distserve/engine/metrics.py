"""GET /metrics through prometheus_client (the engine observability contract in docs/internals.md).

The engine keeps its figures in one stats dict; a collector turns that dict into metric families at scrape
time (nothing is updated per token), into a registry of this engine's own, never the process-global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the Content-Type of GET /metrics (text format 0.0.4)

# name -> (stats key, type, help)
_METRICS = [
    ("distserve_engine_requests_running", "requests_running", "gauge", "requests being prefilled or decoded"),
    ("distserve_engine_requests_waiting", "requests_waiting", "gauge", "requests queued for KV blocks or a batch slot"),
    ("distserve_engine_kv_blocks_used", "kv_blocks_used", "gauge", "KV blocks in use (running, preserved, migrating)"),
    ("distserve_engine_kv_blocks_free", "kv_blocks_free", "gauge", "free KV blocks"),
    ("distserve_engine_kv_blocks_total", "kv_blocks_total", "gauge", "KV blocks in the pool"),
    ("distserve_engine_preserved_blocks", "preserved_blocks", "gauge", "prefill KV blocks kept for a decode engine"),
    ("distserve_engine_preserved_sessions", "preserved_sessions", "gauge", "prefill sessions kept for a decode engine"),
    ("distserve_engine_preserved_expired_total", "preserved_expired_total", "counter",
     "preserved prefill sessions freed by their TTL (no decode claimed them)"),
    ("distserve_engine_prefill_tokens_pending", "prefill_tokens_pending", "gauge", "prompt tokens not yet prefilled"),
    ("distserve_engine_handshakes_total", "handshakes_total", "counter", "p2p_initialize calls served"),
    ("distserve_engine_migrations_total", "migrations_total", "counter", "KV migrations pulled by this engine"),
    ("distserve_engine_migration_failures_total", "migration_failures_total", "counter", "KV migrations that failed"),
    ("distserve_engine_migration_bytes_total", "migration_bytes_total", "counter", "KV bytes pulled by this engine"),
    ("distserve_engine_migration_seconds_total", "migration_seconds_total", "counter",
     "time spent in successful KV pulls"),
    ("distserve_engine_migration_quarantined_blocks", "quarantined_blocks", "gauge",
     "local blocks held back after a migration deadline until the late reads finish"),
    ("distserve_engine_migration_reads_total", "migration_reads_total", "counter",
     "transfer reads issued by KV pulls (DLSlime TCP opens a connection for each)"),
    ("distserve_engine_migrations_landed_total", "migrations_landed_total", "counter",
     "KV pulls landed in the staging arena and unpacked into scattered blocks"),
    ("distserve_engine_migrations_from_packed_total", "migrations_from_packed_total", "counter",
     "KV pulls that read a prefill's packed copy instead of its scattered blocks"),
    ("distserve_engine_kv_packs_total", "kv_packs_total", "counter",
     "preserved prefills whose scattered blocks were packed into the staging arena"),
    ("distserve_engine_staging_blocks_used", "staging_blocks_used", "gauge",
     "staging arena in use, in blocks (packed prefills and landing pulls)"),
    ("distserve_engine_staging_blocks_total", "staging_blocks_total", "gauge", "staging arena size, in blocks"),
    ("distserve_engine_peers", "peers", "gauge", "peers with a p2p handshake"),
    ("distserve_engine_decode_steps_total", "decode_steps_total", "counter", "batched decode steps run"),
    ("distserve_engine_decode_tokens_total", "decode_tokens_total", "counter",
     "tokens decoded (tokens / steps = mean decode batch)"),
    ("distserve_engine_preemptions_total", "preemptions_total", "counter",
     "running sequences preempted for lack of KV blocks (recomputed later)"),
    ("distserve_engine_prefill_seconds_total", "prefill_seconds_total", "counter",
     "wall time of prefill forward passes"),
    ("distserve_engine_prefill_computed_tokens_total", "prefill_computed_tokens_total", "counter",
     "prompt tokens computed by prefill forward passes (prefix-cache hits and migrated KV excluded)"),
    ("distserve_engine_requests_total", "requests_total", "counter", "generation requests accepted"),
    ("distserve_engine_request_errors_total", "request_errors_total", "counter", "requests answered with an error"),
    ("distserve_engine_free_cache_total", "free_cache_total", "counter", "free_cache calls served"),
    ("distserve_engine_prompt_tokens_total", "prompt_tokens_total", "counter",
     "prompt tokens of admitted requests (prefills, recomputes and migrated decodes)"),
    ("distserve_engine_prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens_total", "counter",
     "prompt tokens served from the prefix cache (not computed; on a decode: not migrated)"),
    ("distserve_engine_prefix_cache_blocks", "prefix_cache_blocks", "gauge",
     "KV blocks in the prefix cache (held or evictable)"),
    ("distserve_engine_prefix_cache_evictions_total", "prefix_cache_evictions_total", "counter",
     "cached KV blocks evicted (least recently used leaves first) to make room"),
    ("distserve_engine_prefix_cache_keys", "prefix_cache_keys", "gauge",
     "prefix keys published on the cache-state stream"),
    ("distserve_engine_migration_blocks_reused_total", "migration_blocks_reused_total", "counter",
     "prompt blocks a decode found in its own prefix cache instead of pulling them"),
]


class EngineMetrics:
    """The engine's registry: `stats()` and `labels()` are read at each scrape."""

    def __init__(self, stats: Callable[[], dict], labels: Callable[[], dict[str, str]]) -> None:
        self.stats, self.labels = stats, labels
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        labels = self.labels()
        info = GaugeMetricFamily("distserve_engine_info", "engine identity (value is always 1)", labels=list(labels))
        info.add_metric([str(v) for v in labels.values()], 1)
        yield info
        stats = self.stats()
        for name, key, kind, help_text in _METRICS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=stats.get(key, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
