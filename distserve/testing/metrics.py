"""Reading a Prometheus /metrics page in tests and tools: values, never text.

The page is parsed with prometheus_client's own parser, so label order, `1` vs `1.0` and HELP/TYPE
lines do not matter; a sample is matched by its exact name (`x_total`, `x_bucket`, `x_count`) and by
the labels given (a subset of its labels).
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a page as (name, labels, value)."""
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, labels: dict | None = None) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 when none match)."""
    want = {k: str(v) for k, v in (labels or {}).items()}
    return sum(v for n, lab, v in samples(text) if n == name and want.items() <= lab.items())


def find(text: str, name: str, labels: dict | None = None) -> float | None:
    """The value of the one sample named `name` with exactly these labels; None when there is none."""
    want = {k: str(v) for k, v in (labels or {}).items()}
    return next((v for n, lab, v in samples(text) if n == name and lab == want), None)


def unlabelled(text: str) -> dict[str, float]:
    """name -> value of the samples that carry no labels."""
    return {n: v for n, lab, v in samples(text) if not lab}


def sums(text: str) -> dict[str, float]:
    """name -> sum of its samples over every label set."""
    out: dict[str, float] = {}
    for n, _, v in samples(text):
        out[n] = out.get(n, 0.0) + v
    return out


def scrape(url: str, headers: dict | None = None, timeout: float = 5.0) -> str:
    """GET {url}/metrics (blocking: for sync tests and helper threads)."""
    req = urllib.request.Request(f"{url}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode()
