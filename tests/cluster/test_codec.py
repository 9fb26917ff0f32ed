"""distserve.cluster.codec: every kind decodes to its record, ids are checked against the key, and every bad
value raises the one error type (a discovery MalformedRecord, which watchers count and skip)."""

from __future__ import annotations

import json

import pytest

from discovery.record import MalformedRecord
from distserve.cluster import keys as K, records
from distserve.cluster.codec import Codec, MalformedValue, decode_value

keys = K.Keys("c1")
codec = Codec(keys)


def engine(engine_id: str = "P1") -> records.EngineRecord:
    return records.EngineRecord(id=engine_id, incarnation="i1", role="prefill", url="http://127.0.0.1:1", models=["m"],
                        engine_info=records.EngineGeometry(block_size=16, num_gpu_blocks=8))


def link(p: str = "P1", d: str = "D1") -> records.LinkRecord:
    return records.LinkRecord(prefill_id=p, decode_id=d, prefill_incarnation="i1", decode_incarnation="i2",
                      state="established")


CASES = [
    (keys.engine("P1"), engine(), K.ENGINES, ("P1",)),
    (keys.link("P1", "D1"), link(), K.LINKS, ("P1", "D1")),
    (keys.load("P1"), records.LoadRecord(engine_id="P1", running=2), K.LOAD, ("P1",)),
    (keys.state("P1"), records.OperatorFlags(drain=True), K.STATE, ("P1",)),
    (keys.router("r1"), records.RouterRecord(id="r1", url="http://127.0.0.1:2"), K.ROUTERS, ("r1",)),
    (keys.config(), records.RoutingConfig(strategy="round_robin"), K.CONFIG, ("routing",)),
]


@pytest.mark.parametrize("key,record,kind,ids", CASES, ids=[c[2] for c in CASES])
def test_every_kind_decodes_to_its_typed_record(key, record, kind, ids):
    decoded = codec.decode(key, record.encode())
    assert (decoded.kind, decoded.ids) == (kind, ids)
    assert type(decoded.record) is type(record) and decoded.record == record
    assert codec.record(kind, key, record.encode()) == record
    assert decode_value(kind, ids, record.encode()) == record


def test_typed_shortcuts():
    assert codec.engine(keys.engine("P1"), engine().encode()).id == "P1"
    assert codec.link(keys.link("P1", "D1"), link().encode()).decode_id == "D1"
    assert codec.load(keys.load("P1"), records.LoadRecord(engine_id="P1").encode()).engine_id == "P1"
    assert codec.flags(keys.state("P1"), records.OperatorFlags(cordon=True).encode()).cordon
    assert codec.router(keys.router("r1"), records.RouterRecord(id="r1", url="u").encode()).id == "r1"
    assert codec.routing_config(keys.config(), records.RoutingConfig().encode()).strategy == "min_expected_latency"
    with pytest.raises(MalformedValue, match="expected a engines key"):
        codec.engine(keys.load("P1"), records.LoadRecord(engine_id="P1").encode())


@pytest.mark.parametrize("key,record", [
    (keys.engine("P1"), engine("P2")),
    (keys.router("r1"), records.RouterRecord(id="r2", url="u")),
    (keys.link("P1", "D1"), link("P1", "D2")),
    (keys.link("P1", "D1"), link("P9", "D1")),
    # the router used to accept a load record naming another engine; the stricter rule (ctl's) now holds
    (keys.load("P1"), records.LoadRecord(engine_id="P2")),
], ids=["engine", "router", "link-decode", "link-prefill", "load"])
def test_a_record_naming_other_ids_than_its_key_is_malformed(key, record):
    with pytest.raises(MalformedValue, match="names .* but sits under"):
        codec.decode(key, record.encode())


BAD_VALUES = [
    (keys.engine("P1"), b"not json"),
    (keys.engine("P1"), b'{"id": "P1"}'),  # required fields missing
    (keys.link("P1", "D1"), json.dumps({**link().model_dump(), "state": "bogus"}).encode()),
    (keys.load("P1"), json.dumps({"engine_id": "P1", "running": "many"}).encode()),
    (keys.state("P1"), json.dumps({"schema_version": 99}).encode()),  # from the future
    (keys.router("r1"), b"[]"),
    (keys.config(), json.dumps({"strategy": "prefix_affinity", "params": {"load_factor": "abc"}}).encode()),
    (keys.config("other"), records.RoutingConfig().encode()),  # only config/routing exists
    (keys.root + "nonsense/x", b"{}"),  # outside the schema
    ("/elsewhere/engines/P1", engine().encode()),  # another prefix entirely
]


@pytest.mark.parametrize("key,raw", BAD_VALUES)
def test_every_malformed_value_raises_the_one_error(key, raw):
    with pytest.raises(MalformedValue) as info:
        codec.decode(key, raw)
    assert isinstance(info.value, MalformedRecord)  # what discovery's informer and watchers skip
    assert "\n" not in str(info.value) and str(info.value)


def test_a_bad_routing_config_names_the_field_and_value():
    raw = json.dumps({"strategy": "prefix_affinity", "params": {"load_factor": "abc"}}).encode()
    with pytest.raises(MalformedValue, match=r"params\.load_factor.*'abc'"):
        codec.decode(keys.config(), raw)


def test_another_clusters_key_is_not_this_clusters():
    other = K.Keys("c2")
    with pytest.raises(MalformedValue, match="not a key of cluster 'c1'"):
        codec.decode(other.engine("P1"), engine().encode())
