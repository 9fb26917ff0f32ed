"""docs/keys.md stays true: every example decodes as its record, and plain etcdctl can follow the cluster."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

from discovery.client import EtcdClient
from discovery.embedded import etcd_binary
from distserve.cluster import records
from distserve.cluster.keys import CONFIG, ENGINES, LINKS, LOAD, ROUTERS, STATE, Keys
from tests.util import REPO

RECORD_OF_KIND = {
    ENGINES: records.EngineRecord, LINKS: records.LinkRecord, LOAD: records.LoadRecord,
    STATE: records.OperatorFlags, ROUTERS: records.RouterRecord, CONFIG: records.RoutingConfig,
}


def _examples() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "keys.md").read_text()
    return re.findall(r"^`(/distserve/v1/[^`]+)`[^\n]*\n\n```json\n(.*?)\n```", text, flags=re.M | re.S)


def test_every_documented_example_is_a_valid_record_under_a_valid_key():
    examples = _examples()
    kinds = set()
    for key, body in examples:
        parsed = Keys("default").parse(key)
        assert parsed is not None, f"documented key {key} does not parse"
        cls = RECORD_OF_KIND[parsed.kind]
        record = cls.decode(body)
        # every field the record has is documented in the example (the docs show whole values)
        assert set(json.loads(body)) == set(cls.model_fields), f"{key}: example fields differ from {cls.__name__}"
        assert record.schema_version == 1
        kinds.add(parsed.kind)
    assert kinds == set(RECORD_OF_KIND), "every kind of key has an example"


async def test_etcdctl_watch_from_a_listed_revision_follows_the_cluster(etcd, etcd_client: EtcdClient):
    keys = Keys("default")
    await etcd_client.put(keys.state("decode-0"), records.OperatorFlags(drain=True).encode())
    _, revision = await etcd_client.get_prefix(keys.root)
    engine = records.EngineRecord(id="e1", incarnation="i1", role="decode", url="http://127.0.0.1:1", models=["m"],
                                  engine_info=records.EngineGeometry(block_size=64, num_gpu_blocks=8))
    await etcd_client.put(keys.engine("e1"), engine.encode())
    await etcd_client.delete(keys.state("decode-0"))
    proc = subprocess.Popen(  # noqa: ASYNC220 - a background watcher; start-up does not block
        [etcd_binary("etcdctl"), f"--endpoints={etcd.client_url}", "watch", "--prefix", keys.root,
         "--rev", str(revision + 1)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    watchdog = threading.Timer(10, proc.kill)  # readline() must not block the test forever
    watchdog.start()
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while len(lines) < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line:
                lines.append(line.rstrip("\n"))
        # PUT, key, value, DELETE, key: the change after the listed revision, nothing before it
        assert lines[0] == "PUT" and lines[1] == keys.engine("e1")
        assert records.EngineRecord.decode(lines[2]).id == "e1"
        assert lines[3:5] == ["DELETE", keys.state("decode-0")]
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(5)
