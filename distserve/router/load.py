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
        # Change journal (distserve.router.strategies' indexes): seq counts every change, `changed` holds the
        # engine ids of the last JOURNAL changes. Every mutation of the three maps above notes itself there.
        self.seq = 0
        self.changed: deque[str] = deque(maxlen=JOURNAL)

    def _note(self, engine_id: str) -> None:
        self.seq += 1
        self.changed.append(engine_id)

    # begin and end run twice per request each: _note written out in them (a call less each time)
    def begin(self, engine_id: str) -> None:
        own, delta = self.own, self._delta
        own[engine_id] = own.get(engine_id, 0) + 1
        delta[engine_id] = delta.get(engine_id, 0) + 1
        self.seq += 1
        self.changed.append(engine_id)

    def end(self, engine_id: str) -> None:
        own, delta = self.own, self._delta
        own[engine_id] = own.get(engine_id, 1) - 1
        delta[engine_id] = delta.get(engine_id, 0) - 1
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

    def unfinished(self, engine_id: str) -> int:
        shared = self._shared.get(engine_id)
        own = self.own.get(engine_id, 0)
        if shared is None:
            return own
        estimate = shared + self._delta.get(engine_id, 0)
        return estimate if estimate > own else own
