"""Which engines and prefill->decode pairs are routable, from the records in etcd.

One pure function shared by routers, agents and distserve-ctl, so they all agree:
- an engine is *live* when its record says state "ready" (not starting, draining or unhealthy);
- it takes *new* requests when it is live and not flagged drain or cordon by an operator;
- a link is usable when it is "established" and it names the engine processes of the current engine
  records: their `instance` when the records carry one (a lease that was replaced leaves the engines and
  their connection intact, so the link stays usable while its agent rewrites the record), else their
  incarnation (a reader may see an engine change before the link's record does);
- a decode is routable when it takes new requests and has a usable link; a prefill is routable when it
  takes new requests and has a usable link to a routable decode; hybrid engines need no link;
- a request whose prefill already succeeded may finish on a decode even if that prefill no longer takes new
  requests (`inflight_decodes`): its KV is still in the prefill's process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from distserve.cluster.records import EngineRecord, LinkRecord, OperatorFlags


@dataclass
class Topology:
    engines: dict[str, EngineRecord]
    # prefill id -> routable decode ids linked to it (usable links only)
    decodes_of_prefill: dict[str, list[str]] = field(default_factory=dict)
    routable_prefills: list[str] = field(default_factory=list)
    routable_decodes: list[str] = field(default_factory=list)
    routable_hybrids: list[str] = field(default_factory=list)

    def models(self) -> list[str]:
        seen: dict[str, None] = {}
        for engine_id in (*self.routable_prefills, *self.routable_hybrids):
            for model in self.engines[engine_id].models:
                seen.setdefault(model, None)
        return list(seen)


def same_engine_process(engine: EngineRecord, instance: str | None, incarnation: str) -> bool:
    """Whether a record naming (`instance`, `incarnation`) was made with this engine's current process."""
    if engine.instance and instance:
        return engine.instance == instance
    return engine.incarnation == incarnation


def link_usable(link: LinkRecord, engines: Mapping[str, EngineRecord]) -> bool:
    prefill, decode = engines.get(link.prefill_id), engines.get(link.decode_id)
    return (
        link.state == "established"
        and prefill is not None
        and decode is not None
        and same_engine_process(prefill, link.prefill_instance, link.prefill_incarnation)
        and same_engine_process(decode, link.decode_instance, link.decode_incarnation)
    )


def takes_new_requests(engine: EngineRecord, flags: OperatorFlags | None) -> bool:
    if engine.state != "ready":
        return False
    return not (flags is not None and (flags.drain or flags.cordon))


def compute_topology(
    engines: Mapping[str, EngineRecord],
    links: Mapping[tuple[str, str], LinkRecord],
    flags: Mapping[str, OperatorFlags],
    excluded: frozenset[str] | set[str] = frozenset(),
) -> Topology:
    """`excluded`: engines a reader has locally ruled out (a router's open circuit breakers)."""
    open_ids = {
        engine_id
        for engine_id, engine in engines.items()
        if engine_id not in excluded and takes_new_requests(engine, flags.get(engine_id))
    }
    topo = Topology(engines=dict(engines))
    decodes_with_link: set[str] = set()
    for (prefill_id, decode_id), link in links.items():
        if prefill_id in open_ids and decode_id in open_ids and link_usable(link, engines):
            if engines[prefill_id].role == "prefill" and engines[decode_id].role == "decode":
                topo.decodes_of_prefill.setdefault(prefill_id, []).append(decode_id)
                decodes_with_link.add(decode_id)
    for decodes in topo.decodes_of_prefill.values():
        decodes.sort()
    topo.routable_prefills = sorted(topo.decodes_of_prefill)
    topo.routable_decodes = sorted(decodes_with_link)
    topo.routable_hybrids = sorted(e for e in open_ids if engines[e].role == "hybrid")
    return topo


def inflight_decodes(
    prefill: EngineRecord,
    model: str,
    engines: Mapping[str, EngineRecord],
    links: Mapping[tuple[str, str], LinkRecord],
    flags: Mapping[str, OperatorFlags],
    excluded: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """Decodes an in-flight request may finish on after its prefill on `prefill` succeeded (sorted).

    The prefill's own state no longer matters (it may have been cordoned, drained or marked unhealthy
    meanwhile: its preserved KV is still there); only its record must exist and name the same engine
    process (a new lease is fine: the KV lives in the process). Each decode must take new requests, serve
    the model, have a usable link to that prefill, and not be in `excluded` (a router's open breakers).
    """
    current = engines.get(prefill.id)
    if current is None or not same_engine_process(current, prefill.instance, prefill.incarnation):
        return []
    found = []
    for (prefill_id, decode_id), link in links.items():
        if prefill_id != prefill.id or decode_id in excluded:
            continue
        decode = engines.get(decode_id)
        if (
            decode is not None
            and decode.role == "decode"
            and model in decode.models
            and takes_new_requests(decode, flags.get(decode_id))
            and link_usable(link, engines)
        ):
            found.append(decode_id)
    return sorted(found)
