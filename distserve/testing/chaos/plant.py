"""Malformed values planted in etcd under every prefix routers and agents watch.

Each one is wrong in a different way a careless reader could trip on: not JSON, not an object, wrong types,
a future schema version, bytes that are not UTF-8, a huge value, a record whose id does not match its key,
a key whose ids break the schema, a link to an engine that does not exist. Two of them are *valid-looking*
records that would be routable if accepted (a ready hybrid under a mismatched key, a hybrid under a key
with an invalid id) pointing at a port nobody listens on: a view that took them would fail requests.
"""

from __future__ import annotations

import json
import time

from distserve.cluster.keys import Keys
from distserve.cluster.records import EngineGeometry, EngineRecord, LinkRecord
from distserve.testing.ports import free_port


def _hybrid(engine_id: str) -> EngineRecord:
    return EngineRecord(id=engine_id, incarnation="planted.1", role="hybrid", url=f"http://127.0.0.1:{free_port()}",
                        models=["chaos-tiny"], state="ready", engine_kind="null",
                        engine_info=EngineGeometry(block_size=16, num_gpu_blocks=64))


def planted_values(keys: Keys) -> list[tuple[str, bytes]]:
    e, root = keys.engine, keys.root
    future = _hybrid("future").model_dump(mode="json")
    future["schema_version"] = 99
    wrong_types = _hybrid("wrong-types").model_dump(mode="json")
    wrong_types.update(role="wizard", models="chaos-tiny", engine_info=[1, 2])
    return [
        (e("not-json"), b"{this is not json"),
        (e("not-an-object"), b"[1, 2, 3]"),
        (e("null"), b"null"),
        (e("empty"), b""),
        (e("wrong-types"), json.dumps(wrong_types).encode()),
        (e("future"), json.dumps(future).encode()),
        (e("not-utf8"), b"\xff\xfe\xfa{\x80}"),
        (e("huge"), b'{"id": "huge", "pad": "' + b"x" * (512 * 1024) + b'"}'),
        (e("mismatch"), _hybrid("someone-else").encode()),  # valid record, id != key
        (root + "engines/bad id with spaces", _hybrid("bad id with spaces").encode()),
        (root + "engines/a/b/c", _hybrid("a").encode()),
        (keys.link("p0", "ghost"), LinkRecord(prefill_id="p0", decode_id="ghost", prefill_incarnation="x",
                                             decode_incarnation="y", state="established",
                                             established_at=time.time()).encode()),
        (keys.link("ghost", "d0"), b'{"state": "established"}'),
        (root + "links/only-one-id", b"{}"),
        (keys.load("p0-ghost"), b'{"engine_id": 7, "running": "many"}'),
        (keys.load("not-json"), b"\x00\x01"),
        (keys.state("d0"), b'{"drain": "yes please", "cordon": []}'),  # a real engine's operator flags
        (keys.state("ghost"), b"not json"),
        (keys.router("ghost"), b"{"),
        (keys.config(), b'{"strategy": "teleport", "weights": "heavy"}'),
        (root + "unknown-kind/x", b"whatever"),
        (root + "engines", b"a key named like a prefix"),
    ]


async def plant_malformed(client, keys: Keys) -> list[str]:
    planted = []
    for key, value in planted_values(keys):
        await client.put(key, value)
        planted.append(key)
    return planted


async def remove_planted(client, keys: list[str]) -> None:
    for key in keys:
        await client.delete(key)
