"""The router's metrics (distserve/router/metrics.py): what the hot path records with list appends
(`Counter.add`, `Histogram.observer`) reads and renders exactly as the per-call methods' records would."""

from __future__ import annotations

import math
import random

from distserve.router.metrics import LATENCY_BUCKETS, Counter, Histogram, Registry


def _rendered(metric) -> list[str]:
    return list(metric.render())


def test_counter_add_counts_as_inc_does_and_is_folded_on_every_read():
    by_add, by_inc = Counter("c_total", "h", ("phase", "engine")), Counter("c_total", "h", ("phase", "engine"))
    rng = random.Random(5)
    for _ in range(500):
        labels = (rng.choice(("prefill", "decode")), f"e{rng.randrange(7)}")
        by_add.add(labels)
        by_inc.inc(labels)
    by_add.inc(("prefill", "e0"), 3)  # both ways on one series
    by_inc.inc(("prefill", "e0"), 3)
    assert by_add.get(("prefill", "e0")) == by_inc.get(("prefill", "e0")) > 3
    by_add.add(("decode", "e1"))  # after a read: still counted
    by_inc.inc(("decode", "e1"))
    assert by_add.total() == by_inc.total() == 504
    assert _rendered(by_add) == _rendered(by_inc)
    assert by_add._ones == []


def test_histogram_observer_buckets_sums_and_counts_as_observe_does():
    """Values on the bucket bounds (`le` is inclusive), between them, past the last (+Inf) and zero; a fold in
    the middle, after which the same observer still records."""
    by_observer = Histogram("h_seconds", "h", ("route",))
    by_observe = Histogram("h_seconds", "h", ("route",))
    rng = random.Random(11)
    values = [*LATENCY_BUCKETS, 0.0, 500.0, *(rng.uniform(0, 200) for _ in range(300)),
              *(rng.expovariate(400) for _ in range(300))]
    observe_a, observe_b = by_observer.observer(("/a",)), by_observer.observer(("/b",))
    for i, v in enumerate(values):
        (observe_a if i % 3 else observe_b)(v)
        by_observe.observe(v, ("/a",) if i % 3 else ("/b",))
        if i == 200:
            assert by_observer.count(("/a",)) == by_observe.count(("/a",))  # a read folds what came so far
    assert by_observer.count(("/b",)) == by_observe.count(("/b",)) == len(values[::3])
    # the same lines; a sum to within float rounding (a fold adds its values up before adding them in)
    got, want = _rendered(by_observer), _rendered(by_observe)
    assert [line for line in got if "_sum" not in line] == [line for line in want if "_sum" not in line]
    sums = [(float(a.rsplit(" ", 1)[1]), float(b.rsplit(" ", 1)[1]))
            for a, b in zip(got, want) if "_sum" in a]
    assert len(sums) == 2 and all(math.isclose(a, b, rel_tol=1e-12) for a, b in sums), sums


def test_a_series_appears_once_it_has_a_value_and_the_registry_folds_every_metric():
    registry = Registry()
    hist = registry.add(Histogram("h_seconds", "h", ("phase",)))
    counter = registry.add(Counter("c_total", "h", ("phase",)))
    observe = hist.observer(("prefill",))
    hist.observer(("decode",))  # made, never used: no series
    assert _rendered(hist) == []
    observe(0.002)
    observe(0.001)  # on a bound: counted in it (`le`)
    counter.add(("prefill",))
    registry.fold()
    assert hist._pending[("prefill",)] == [] and counter._ones == []
    text = registry.render().decode()
    assert 'h_seconds_count{phase="prefill"} 2' in text and 'phase="decode"' not in text
    assert 'c_total{phase="prefill"} 1' in text
    assert 'h_seconds_bucket{phase="prefill",le="0.0005"} 0' in text
    assert 'h_seconds_bucket{phase="prefill",le="0.001"} 1' in text
    assert 'h_seconds_bucket{phase="prefill",le="0.0025"} 2' in text
    assert 'h_seconds_sum{phase="prefill"} 0.003' in text
