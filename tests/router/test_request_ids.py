"""Request ids the router makes for requests that bring none: 32 hex digits, never repeated, not within a
process, not between router processes, not in a forked child (where a copied counter would repeat)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from distserve.router.app import _new_request_id

HEX32 = re.compile(r"^[0-9a-f]{32}$")
PRINT_IDS = "from distserve.router.app import _new_request_id as n; print(n(), n())"


def test_ids_are_32_hex_digits_and_unique_in_a_process():
    ids = [_new_request_id() for _ in range(20_000)]
    assert all(HEX32.match(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_two_router_processes_never_share_ids():
    runs = [subprocess.run([sys.executable, "-c", PRINT_IDS], capture_output=True, text=True, check=True,
                           timeout=60).stdout.split() for _ in range(2)]
    assert len(set(runs[0]) | set(runs[1])) == 4
    assert runs[0][0][:16] != runs[1][0][:16]  # each process draws its own random prefix


def test_a_forked_child_does_not_repeat_its_parents_ids():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(_new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    mine = {_new_request_id() for _ in range(3)}
    with os.fdopen(read) as f:
        theirs = set(f.read().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 3 and not mine & theirs
    assert {i[:16] for i in mine}.isdisjoint(i[:16] for i in theirs)
