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
    """unfinished(e) = max(own, shared + delta): `own` this replica's requests in flight on e, `shared` the last
    load record's figure, `delta` own starts - own ends since it. Between two records own and delta move
    together, so that is own + max(0, shared - own at the record): a start or an end moves `current` by one,
    as it moves `own` (two dict updates a call; the journal's note besides), and a record sets it afresh."""

    def __init__(self) -> None:
        self.own: dict[str, int] = {}  # requests this replica has in flight, per engine
        self._shared: dict[str, int] = {}  # in_flight from the last load record
        # unfinished() of every engine with any of the two (absent: 0), set by each mutation: a strategy reads
        # it with a dict lookup, or many at once in C, instead of a call per engine
        self.current: dict[str, int] = {}
        # Change journal (distserve.router.strategies' indexes): seq counts every change, `changed` holds the
        # engine ids of the last JOURNAL changes. Every mutation of the maps above notes itself there.
        self.seq = 0
        self.changed: deque[str] = deque(maxlen=JOURNAL)

    def _note(self, engine_id: str) -> None:
        """unfinished() from scratch, as of a record (or none): the record's figure, never below own."""
        own = self.own.get(engine_id, 0)
        shared = self._shared.get(engine_id)
        self.current[engine_id] = own if shared is None or shared <= own else shared
        self.seq += 1
        self.changed.append(engine_id)

    # begin and end run twice per request each: the journal's note written out in them (a call less each time)
    def begin(self, engine_id: str) -> None:
        own, current = self.own, self.current
        own[engine_id] = own.get(engine_id, 0) + 1
        current[engine_id] = current.get(engine_id, 0) + 1
        self.seq += 1
        self.changed.append(engine_id)

    def end(self, engine_id: str) -> None:
        own, current = self.own, self.current
        own[engine_id] = own.get(engine_id, 1) - 1
        current[engine_id] = current.get(engine_id, 1) - 1
        self.seq += 1
        self.changed.append(engine_id)

    def on_load(self, engine_id: str, record: LoadRecord | None) -> None:
        if record is None:
            self._shared.pop(engine_id, None)
        else:
            self._shared[engine_id] = record.in_flight
        self._note(engine_id)

    def forget(self, engine_id: str) -> None:
        self._shared.pop(engine_id, None)
        self._note(engine_id)
        if not self.own.get(engine_id):  # nothing of it left here: no entry (engines come and go)
            self.current.pop(engine_id, None)

    def unfinished(self, engine_id: str) -> int:
        """Requests unfinished on the engine: the last load record's figure plus this replica's starts minus
        its ends since, and never less than what this replica has in flight there."""
        return self.current.get(engine_id, 0)
