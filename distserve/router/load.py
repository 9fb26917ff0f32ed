"""How busy each engine is, as this replica sees it.

The agents publish `load/<engine>` (running + waiting) at most every 0.5 s; between two records this
replica adds what it started and subtracts what finished since the last one, so its estimate moves with
its own traffic at once and snaps back to the shared figure whenever a record arrives. Because every
replica starts from the same shared record, replicas agree up to their own last half second of traffic.
"""

from __future__ import annotations

from collections import deque

from distserve.cluster.records import LoadRecord

# Engines whose unfinished() changed, newest last: enough for the strategies' per-candidate-set indexes to
# catch up between two picks under any traffic (one that falls further behind rebuilds, as a scan would).
JOURNAL = 4096


class LoadTracker:
    def __init__(self) -> None:
        self.own: dict[str, int] = {}  # requests this replica has in flight, per engine
        self._delta: dict[str, int] = {}  # own starts - own ends since the engine's last load record
        self._shared: dict[str, int] = {}  # in_flight from the last load record
        # unfinished() of every engine with any of the three (absent: 0), set by each mutation: a strategy reads
        # it with a dict lookup, or many at once in C, instead of a call per engine
        self.current: dict[str, int] = {}
        # Change journal (distserve.router.strategies' indexes): seq counts every change, `changed` holds the
        # engine ids of the last JOURNAL changes. Every mutation of the maps above notes itself there.
        self.seq = 0
        self.changed: deque[str] = deque(maxlen=JOURNAL)

    def _note(self, engine_id: str) -> None:
        own = self.own.get(engine_id, 0)
        shared = self._shared.get(engine_id)
        if shared is None:
            self.current[engine_id] = own
        else:
            estimate = shared + self._delta.get(engine_id, 0)
            self.current[engine_id] = estimate if estimate > own else own
        self.seq += 1
        self.changed.append(engine_id)

    # begin and end run twice per request each: _note written out in them (a call less each time)
    def begin(self, engine_id: str) -> None:
        own, delta = self.own, self._delta
        n = own[engine_id] = own.get(engine_id, 0) + 1
        d = delta[engine_id] = delta.get(engine_id, 0) + 1
        shared = self._shared.get(engine_id)
        if shared is None or shared + d <= n:
            self.current[engine_id] = n
        else:
            self.current[engine_id] = shared + d
        self.seq += 1
        self.changed.append(engine_id)

    def end(self, engine_id: str) -> None:
        own, delta = self.own, self._delta
        n = own[engine_id] = own.get(engine_id, 1) - 1
        d = delta[engine_id] = delta.get(engine_id, 0) - 1
        shared = self._shared.get(engine_id)
        if shared is None or shared + d <= n:
            self.current[engine_id] = n
        else:
            self.current[engine_id] = shared + d
        self.seq += 1
        self.changed.append(engine_id)

    def on_load(self, engine_id: str, record: LoadRecord | None) -> None:
        if record is None:
            self._shared.pop(engine_id, None)
        else:
            self._shared[engine_id] = record.in_flight
        self._delta[engine_id] = 0
        self._note(engine_id)

    def forget(self, engine_id: str) -> None:
        self._shared.pop(engine_id, None)
        self._delta.pop(engine_id, None)
        self._note(engine_id)
        if not self.own.get(engine_id):  # nothing of it left here: no entry (engines come and go)
            self.current.pop(engine_id, None)

    def unfinished(self, engine_id: str) -> int:
        """Requests unfinished on the engine: the last load record's figure plus this replica's starts minus
        its ends since, and never less than what this replica has in flight there."""
        return self.current.get(engine_id, 0)
