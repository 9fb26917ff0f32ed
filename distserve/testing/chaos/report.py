"""A scenario's result: what was sent and what came back, how long detection and recovery took, what was
left behind, and the pass/fail assertions. Written as JSON (docs/bench/chaos/<scenario>.json, plotted by
tools/bench_report.py) and printed as a short text block."""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distserve.testing.chaos.load import RequestRecord


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Result:
    scenario: str
    description: str
    form: str  # short | long
    cluster: dict = field(default_factory=dict)
    fault_at: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    times: dict[str, float | None] = field(default_factory=dict)  # detect_s, recover_s, ... (seconds)
    figures: dict = field(default_factory=dict)  # anything else measured
    preserved_blocks: dict[str, float | None] = field(default_factory=dict)
    keys_without_lease: list[str] = field(default_factory=list)
    stale_records: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    duration_s: float = 0.0
    error: str | None = None
    traceback: str | None = None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def summary(self) -> dict:
        failed = [r for r in self.requests if not r.ok]
        by_outcome = Counter(r.outcome for r in self.requests)
        by_status = Counter(str(r.status) for r in failed)
        return {"sent": len(self.requests), "succeeded": len(self.requests) - len(failed), "failed": len(failed),
                "failed_by_outcome": dict(by_outcome - Counter({"ok": by_outcome["ok"]})),
                "failed_by_status": dict(by_status)}

    def to_json(self) -> dict:
        return {
            "scenario": self.scenario, "description": self.description, "form": self.form,
            "passed": self.passed, "error": self.error, "traceback": self.traceback, "started_at": self.started_at,
            "duration_s": round(self.duration_s, 2), "machine": machine(), "cluster": self.cluster,
            "fault_at": self.fault_at, "events": [{"t": t, "label": label} for t, label in self.events],
            "summary": self.summary(), "times": self.times, "figures": self.figures,
            "preserved_blocks": self.preserved_blocks, "keys_without_lease": self.keys_without_lease,
            "stale_records": self.stale_records,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "requests": [r.to_json() for r in self.requests], "timeline": self.timeline,
        }

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.scenario}.json"
        path.write_text(json.dumps(self.to_json(), separators=(",", ":"), default=str))
        return path

    def text(self) -> str:
        s = self.summary()
        lines = [(f"== {self.scenario} ({self.form}): {'PASS' if self.passed else 'FAIL'} "
                  f"in {self.duration_s:.1f}s — {self.description}"),
                 f"   requests: sent {s['sent']}, succeeded {s['succeeded']}, failed {s['failed']}"
                 + (f" {s['failed_by_outcome']} statuses {s['failed_by_status']}" if s["failed"] else "")]
        if self.times:
            lines.append("   times: " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.times.items()))
        if self.figures:
            lines.append("   figures: " + ", ".join(f"{k} {v}" for k, v in self.figures.items()))
        lines.append(f"   preserved blocks left: {self.preserved_blocks or '-'}; keys without a lease: "
                     f"{len(self.keys_without_lease)}; stale records: {len(self.stale_records)}")
        if self.error:
            lines.append(f"   ERROR: {self.error}")
            if self.traceback:
                lines.append("   " + self.traceback.strip().replace("\n", "\n   "))
        for c in self.checks:
            lines.append(f"   [{'ok' if c.ok else 'FAIL'}] {c.name}" + (f" — {c.detail}" if c.detail else ""))
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}s"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
