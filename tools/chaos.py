#!/usr/bin/env python
"""The chaos suite: live clusters under load, one fault each, pass/fail assertions (docs/chaos.md).

    python tools/chaos.py --list
    python tools/chaos.py --scenario prefill-kill                 # long form, one scenario
    python tools/chaos.py --scenario all --out docs/bench/chaos   # every scenario, JSON results for the report
    python tools/chaos.py --scenario ci --form short              # what CI runs (tests/chaos)

Exit status 0 when every scenario run passed, 1 otherwise. Results: one JSON per scenario under --out
(plotted by tools/bench_report.py); process logs stay in the run directory printed for each scenario
when --keep-logs is given (else they are removed after a passing run).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from distserve.testing.chaos.scenarios import SCENARIOS, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/chaos.py", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None, metavar="NAME",
                        help="a scenario name, 'all', or 'ci' (the short CI set); repeatable")
    parser.add_argument("--form", choices=["short", "long"], default="long",
                        help="short: CI form (fewer engines, shorter holds); long: the full form (default)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON results")
    parser.add_argument("--keep-logs", action="store_true", help="keep every run directory (process logs)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


def selected(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out += list(SCENARIOS)
        elif name == "ci":
            out += [n for n, s in SCENARIOS.items() if s.in_ci]
        elif name in SCENARIOS:
            out.append(name)
        else:
            raise SystemExit(f"tools/chaos.py: unknown scenario {name!r} (see --list)")
    return list(dict.fromkeys(out))


async def main_async(args: argparse.Namespace) -> int:
    names = selected(args.scenario or ["all"])
    results = []
    for name in names:
        keep = Path(tempfile.mkdtemp(prefix=f"distserve-chaos-{name}-"))
        result = await run(name, args.form, out_dir=args.out, keep_dir=keep)
        print(result.text(), flush=True)
        if result.passed and not args.keep_logs:
            shutil.rmtree(keep, ignore_errors=True)
        else:
            print(f"   logs: {keep / 'logs'}", flush=True)
        results.append(result)
    failed = [r.scenario for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} scenarios passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, sc in SCENARIOS.items():
            print(f"{name:18} {'[ci] ' if sc.in_ci else '     '}{sc.description}")
        return 0
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
