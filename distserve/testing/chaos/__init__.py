"""The chaos suite's building blocks (see docs/chaos.md); processes and ports come from distserve.testing.

- `cluster`: a live cluster of real processes (etcd 1 or 3 members, reference engines with agents, routers)
  and the faults injected into it;
- `load`: a steady load of streamed and non-streamed PD requests through the routers, every request recorded;
- `observe`: what the cluster looks like from outside, sampled over time (routers' readiness, etcd's
  records, engines' metrics) and scans for leftovers (keys without a lease, preserved blocks);
- `report`: the per-scenario result (counts, detection and recovery times, assertions) as JSON and text;
- `scenarios`: the scenarios themselves, each with pass/fail assertions.
"""
