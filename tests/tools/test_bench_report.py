"""tools/bench_report.py --paired: router CPU per request, medians and ratios paired by repeat."""

from __future__ import annotations

from tools.bench_report import paired_table


def _cell(mode: str, rep: int, cpu: float, p99: float = 0.002) -> dict:
    return {"rep": rep, "mode": mode, "stream": False, "concurrency": 16, "cpu_ms_per_req": cpu, "p99": p99}


def test_ratios_are_paired_by_repeat_not_taken_from_the_medians():
    # the host slows down in repeat 1 for every front end alike: paired, distserve is 1.10x the gateway both times
    steady = [_cell("distserve", 0, 0.110), _cell("sglang", 0, 0.100), _cell("distserve-base", 0, 0.100),
              _cell("distserve", 1, 0.220), _cell("sglang", 1, 0.200), _cell("distserve-base", 1, 0.275),
              _cell("direct", 0, 0.0, 0.004), _cell("direct", 1, 0.0, 0.006)]
    table = paired_table({"steady": steady}).splitlines()
    assert table[0].startswith("| stream, concurrency | distserve | gateway | baseline tree")
    row = table[2].split(" | ")
    assert row[0] == "| no, 16"
    assert row[1:4] == ["0.165", "0.150", "0.188"]  # medians of the two repeats
    assert row[4] == "1.10× (1.10-1.10)"
    assert row[5] == "0.95× (0.80-1.10)"
    assert row[6] == "2.000 / 2.000 / 5.000 |"
