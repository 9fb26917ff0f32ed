#!/usr/bin/env python
"""Collects the benchmarks' JSON results into PNG plots and markdown tables (for docs/benchmarks.md).

Inputs (each optional; what is missing is reported, not invented):
- chaos results, one JSON per scenario (`tools/chaos.py --out docs/bench/chaos`) -> a failover timeline per
  scenario, `<dir>/<scenario>.png`: request latency by outcome against time from the fault, requests
  completed per half second by outcome, and what the routers and etcd reported, with every fault and
  repair marked; plus a summary table;
- scale results (`tools/bench_scale.py`, docs/bench/scale.json) -> its table;
- the router benchmark's results (`tools/bench_router.py` writes .bench/bench_router.json) -> added latency
  and throughput against concurrency (direct vs distserve vs LMDeploy's proxy), and cold start;
- KV migration results (`tools/bench_migration.py --json docs/bench/migration-h200-host.json`) -> bandwidth
  and ratio to a socket copy against KV size, `<json>.png`.

    python tools/bench_report.py                     # everything found, plots next to their JSON
    python tools/bench_report.py --markdown-only     # tables only
    python tools/bench_report.py --paired docs/bench/<steady>.json   # CPU per request, ratios paired by repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUTCOME_COLORS = {"ok": "#2ca02c", "error_event": "#ff7f0e", "http_error": "#d62728", "disconnected": "#9467bd",
                  "truncated": "#000000", "unreachable": "#7f7f7f", "timeout": "#8c564b", "bad_answer": "#e377c2"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- chaos
def chaos_timeline(result: dict, path: Path) -> None:
    plt = _plt()
    t0 = result.get("fault_at") or result["started_at"]
    requests = result["requests"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 2]})
    ax_lat, ax_rate, ax_view = axes
    # 1. latency of every request at its start time, by outcome
    for outcome, color in OUTCOME_COLORS.items():
        xs = [r["start"] - t0 for r in requests if r["outcome"] == outcome and r["end"]]
        ys = [max(1e-3, r["end"] - r["start"]) for r in requests if r["outcome"] == outcome and r["end"]]
        if xs:
            n = len(xs)
            ax_lat.scatter(xs, ys, s=6 if outcome == "ok" else 28, c=color, alpha=0.45 if outcome == "ok" else 0.95,
                           marker="o" if outcome == "ok" else "X", label=f"{outcome} ({n})", linewidths=0)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("request latency (s)\nat its start time")
    ax_lat.legend(loc="upper left", fontsize=8, ncol=4)
    # 2. requests completed per 0.5 s, by outcome (stacked)
    width = 0.5
    ends = [(r["end"] - t0, r["outcome"]) for r in requests if r["end"]]
    if ends:
        lo = min(e for e, _ in ends)
        hi = max(e for e, _ in ends)
        nbins = max(1, int((hi - lo) / width) + 1)
        edges = [lo + i * width for i in range(nbins)]
        bottom = [0] * nbins
        for outcome, color in OUTCOME_COLORS.items():
            counts = [0] * nbins
            for e, o in ends:
                if o == outcome:
                    counts[min(nbins - 1, int((e - lo) / width))] += 1
            if any(counts):
                ax_rate.bar(edges, counts, width=width, bottom=bottom, color=color, align="edge", linewidth=0)
                bottom = [b + c for b, c in zip(bottom, counts)]
    ax_rate.set_ylabel(f"requests ended\nper {width:g} s")
    # 3. what the routers and etcd reported
    tl = result.get("timeline") or []
    if tl:
        xs = [row["t"] - t0 for row in tl]
        names = sorted({n for row in tl for n in row["routers"]})
        for i, name in enumerate(names):
            pre = [(row["routers"].get(name) or [None, None, None])[1] for row in tl]
            dec = [(row["routers"].get(name) or [None, None, None])[2] for row in tl]
            off = 0.04 * i  # keep overlapping lines visible
            ax_view.step(xs, [None if v is None else v + off for v in pre], where="post", lw=1.2,
                         label=f"{name}: routable prefill")
            ax_view.step(xs, [None if v is None else v + off for v in dec], where="post", lw=1.2, ls="--",
                         label=f"{name}: routable decode")
        ax_view.step(xs, [row["engines_ready"] if row["etcd_ok"] else None for row in tl], where="post", color="k",
                     lw=0.8, alpha=0.6, label="etcd: engines ready")
        down = [x for x, row in zip(xs, tl) if not row["etcd_ok"]]
        if down:
            ax_view.axvspan(min(down), max(down), color="#d62728", alpha=0.08, label="etcd unreachable")
        ax_view.legend(loc="lower left", fontsize=7, ncol=3)
    ax_view.set_ylabel("engines")
    ax_view.set_xlabel("seconds from the fault")
    for ax in axes:
        for ev in result.get("events", []):
            ax.axvline(ev["t"] - t0, color="#444444", lw=0.8, ls=":")
    for ev in result.get("events", []):
        ax_lat.annotate(ev["label"], xy=(ev["t"] - t0, 1.0), xycoords=("data", "axes fraction"), rotation=30,
                        fontsize=7, ha="left", va="bottom")
    s = result["summary"]
    verdict = "PASS" if result["passed"] else "FAIL"
    fig.suptitle(f"{result['scenario']} ({result['form']}): {verdict} — sent {s['sent']}, failed {s['failed']}\n"
                 f"{result['description']}", fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chaos_table(results: list[dict]) -> str:
    rows = [("| scenario | result | sent | failed (outcome/status) | detect | recover | preserved blocks left | "
             "keys without lease | checks |"), "| --- | --- | ---: | --- | --- | --- | --- | ---: | --- |"]
    for r in results:
        s, t = r["summary"], r["times"]
        failed = f"{s['failed']}" + (f" ({', '.join(f'{k} {v}' for k, v in s['failed_by_outcome'].items())})"
                                      if s["failed"] else "")
        detect = _secs(t.get("detect_s"))
        recover = _secs(t.get("recover_s"))
        preserved = sum(v or 0 for v in r["preserved_blocks"].values()) if r["preserved_blocks"] else "-"
        ok = sum(1 for c in r["checks"] if c["ok"])
        rows.append(f"| {r['scenario']} | {'PASS' if r['passed'] else '**FAIL**'} | {s['sent']} | {failed} | "
                    f"{detect} | {recover} | {preserved} | {len(r['keys_without_lease'])} | "
                    f"{ok}/{len(r['checks'])} |")
    return "\n".join(rows)


def _secs(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


# ---------------------------------------------------------------------------------------------- router
def router_plots(data: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    steady = data.get("steady") or []
    paths = []
    if steady:
        fig, (ax_lat, ax_rps) = plt.subplots(1, 2, figsize=(11, 4))
        for stream in (False, True):
            direct = {}
            for conc in sorted({r["concurrency"] for r in steady}):
                rs = [r for r in steady if r["mode"] == "direct" and r["stream"] == stream and r["concurrency"] == conc]
                if rs:
                    direct[conc] = statistics.median(r["p50"] for r in rs)
            for mode, marker in (("distserve", "o"), ("lmdeploy", "s"), ("direct", "^")):
                concs, added, rps = [], [], []
                for conc in sorted({r["concurrency"] for r in steady}):
                    rs = [r for r in steady if r["mode"] == mode and r["stream"] == stream and r["concurrency"] == conc]
                    if not rs:
                        continue
                    concs.append(conc)
                    added.append((statistics.median(r["p50"] for r in rs) - direct.get(conc, 0)) * 1e3)
                    rps.append(statistics.median(r["rps"] for r in rs))
                if not concs:
                    continue
                label = f"{mode}, {'stream' if stream else 'non-stream'}"
                ls = "--" if stream else "-"
                if mode != "direct":
                    ax_lat.plot(concs, added, marker=marker, ls=ls, label=label)
                ax_rps.plot(concs, rps, marker=marker, ls=ls, label=label)
        ax_lat.set_xscale("log", base=2)
        ax_lat.set_xlabel("concurrency")
        ax_lat.set_ylabel("added latency p50 vs direct (ms)")
        ax_lat.legend(fontsize=8)
        ax_rps.set_xscale("log", base=2)
        ax_rps.set_xlabel("concurrency")
        ax_rps.set_ylabel("requests/s")
        ax_rps.legend(fontsize=8)
        fig.suptitle(f"router overhead and throughput (tools/bench_router.py) — {data.get('machine', '')}",
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / "router-latency-throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    cold = data.get("cold") or []
    if cold:
        fig, ax = plt.subplots(figsize=(7, 4))
        modes = sorted({r["mode"] for r in cold})
        sizes = sorted({r["size"] for r in cold})
        w = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            vals = []
            for size in sizes:
                rs = [r["first_success_s"] for r in cold if r["mode"] == mode and r["size"] == size]
                vals.append(statistics.median(rs) if rs else 0)
            ax.bar([j + i * w for j in range(len(sizes))], vals, width=w, label=mode)
        ax.set_xticks([j + w * (len(modes) - 1) / 2 for j in range(len(sizes))])
        ax.set_xticklabels([f"{s}x{s}" for s in sizes])
        ax.set_ylabel("process start -> first PD success (s)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "router-cold-start.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- migration
MIGRATION_MODES = (("socket", "socket copy (baseline)", "k", "-"), ("contiguous", "contiguous blocks", "C0", "-"),
                   ("scattered_staged", "scattered, staged", "C1", "-"),
                   ("scattered_direct", "scattered, direct (no staging)", "C3", "--"))


def migration_plot(data: dict, path: Path) -> None:
    """Bandwidth and ratio to the socket copy against KV size (tools/bench_migration.py --json)."""
    plt = _plt()
    rows = data["rows"]
    sizes = [r["size_mib"] for r in rows]
    fig, (ax_bw, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, label, color, ls in MIGRATION_MODES:
        ax_bw.plot(sizes, [r[f"{mode}_gib_s"] for r in rows], marker="o", color=color, ls=ls, label=label)
        if mode != "socket":
            ax_ratio.plot(sizes, [r[f"{mode}_ratio"] for r in rows], marker="o", color=color, ls=ls, label=label)
    ax_ratio.plot(sizes, [r["scattered_staged_with_pack_ratio"] for r in rows], marker="x", color="C1", ls=":",
                  label="scattered, staged, + prefill's pack")
    ax_ratio.axhline(0.7, color="grey", lw=0.8, ls=":")
    ax_ratio.text(sizes[0], 0.72, "goal 0.7", fontsize=8, color="grey")
    for ax in (ax_bw, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV size (MiB)")
        ax.legend(fontsize=8)
    ax_bw.set_ylabel("GiB/s (median)")
    ax_ratio.set_ylabel("ratio to the socket copy of the same run")
    fig.suptitle(f"KV migration over DLSlime TCP, loopback (tools/bench_migration.py) — {data.get('cpus')} CPUs, "
                 f"median of {data.get('repeat')} interleaved runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- paired ratios
def paired_table(result: dict) -> str:
    """bench_router.py --scenarios steady's router CPU per PD request, side by side: per cell the medians over the
    repeats, and the medians (ranges) of the ratios paired by repeat (the same run, the same repeat: the host's
    state drifts between repeats more than the front ends differ), distserve against the gateway and against the
    baseline tree; p99 latencies of distserve, the gateway and one direct engine call."""
    cells: dict[tuple, dict[str, dict[int, dict]]] = {}
    for c in result["steady"]:
        cells.setdefault((c["stream"], c["concurrency"]), {}).setdefault(c["mode"], {})[c["rep"]] = c

    def median(runs: dict[int, dict], key: str, scale: float = 1.0) -> str:
        return f"{statistics.median(r[key] * scale for r in runs.values()):.3f}" if runs else "-"

    def ratios(a: dict[int, dict], b: dict[int, dict]) -> str:
        paired = [a[k]["cpu_ms_per_req"] / b[k]["cpu_ms_per_req"] for k in a if k in b and b[k]["cpu_ms_per_req"]]
        if not paired:
            return "-"
        return f"{statistics.median(paired):.2f}× ({min(paired):.2f}-{max(paired):.2f})"

    rows = ["| stream, concurrency | distserve | gateway | baseline tree | distserve / gateway | distserve / baseline "
            "| p99 ms: distserve / gateway / direct |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (stream, concurrency), modes in sorted(cells.items()):
        ds, gw, base = (modes.get(m, {}) for m in ("distserve", "sglang", "distserve-base"))
        p99 = " / ".join(median(modes.get(m, {}), "p99", 1000.0) for m in ("distserve", "sglang", "direct"))
        rows.append(f"| {'yes' if stream else 'no'}, {concurrency} | {median(ds, 'cpu_ms_per_req')} | "
                    f"{median(gw, 'cpu_ms_per_req')} | {median(base, 'cpu_ms_per_req')} | {ratios(ds, gw)} | "
                    f"{ratios(ds, base)} | {p99} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/bench_report.py", description=__doc__.splitlines()[0])
    p.add_argument("--chaos", type=Path, default=REPO / "docs" / "bench" / "chaos")
    p.add_argument("--scale", type=Path, default=REPO / "docs" / "bench" / "scale.json")
    p.add_argument("--router", type=Path, nargs="+",
                   default=[REPO / "docs" / "bench" / "bench_router.json", REPO / ".bench" / "bench_router.json",
                            REPO / "docs" / "bench" / "router-h100-host.json"],
                   help="bench_router.py's JSON (the first that exists is used)")
    p.add_argument("--migration", type=Path, default=REPO / "docs" / "bench" / "migration-h200-host.json",
                   help="tools/bench_migration.py --json output")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="where router plots go")
    p.add_argument("--markdown-only", action="store_true")
    p.add_argument("--paired", type=Path, metavar="JSON",
                   help="only print bench_router.py --scenarios steady's paired CPU ratios from this JSON")
    args = p.parse_args(argv)
    if args.paired is not None:
        print(paired_table(json.loads(args.paired.read_text())))
        return 0
    made: list[Path] = []
    missing: list[str] = []

    chaos = [json.loads(f.read_text()) for f in sorted(args.chaos.glob("*.json"))] if args.chaos.is_dir() else []
    if chaos:
        print("### Chaos scenarios\n")
        print(chaos_table(chaos))
        print()
        if not args.markdown_only:
            for r in chaos:
                path = args.chaos / f"{r['scenario']}.png"
                chaos_timeline(r, path)
                made.append(path)
    else:
        missing.append(f"chaos results ({args.chaos}/*.json)")

    if args.scale.exists():
        from tools.bench_scale import markdown

        print("### Scale\n")
        print(markdown(json.loads(args.scale.read_text())))
        print()
    else:
        missing.append(f"scale results ({args.scale})")

    router = next((path for path in args.router if path.exists()), None)
    if router is not None and not args.markdown_only:
        made += router_plots(json.loads(router.read_text()), args.out)
    elif router is None:
        missing.append("router results (" + " or ".join(str(x) for x in args.router) + ")")
    if args.migration.exists():
        if not args.markdown_only:
            path = args.migration.with_suffix(".png")
            migration_plot(json.loads(args.migration.read_text()), path)
            made.append(path)
    else:
        missing.append(f"KV migration results ({args.migration})")

    for path in made:
        print(f"plot: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    for what in missing:
        print(f"not plotted: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
