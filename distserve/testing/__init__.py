"""The harness the test suites and the bench/chaos tools share (like aiohttp's test_utils).

- `ports`: free loopback ports, one or a run of consecutive ones;
- `procs`: child OS processes (`python -m distserve ...` or any argv) with their output in a file, in their
  own process group, and `wait_http`;
- `chaos`: a live cluster of real processes and the faults the chaos suite injects into it.

Importing this package (or `ports` / `procs`) imports neither torch nor dlslime.
"""
