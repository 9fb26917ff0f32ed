"""Auto-compaction of the embedded etcd: a long-lived member keeps a bounded history (issue 16, defect 11)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from discovery.client import EtcdClient, RevisionCompacted
from discovery.config import EtcdConfig
from discovery.embedded import DEFAULT_AUTO_COMPACTION, AutoCompaction, EmbeddedEtcd
from tests.util import REPO


async def _rewrite_then_wait_for_compaction(endpoints: list[str], timeout: float = 20.0) -> tuple[int, int]:
    """Rewrite one key 50 times (as agents rewrite load records), then wait until etcd has compacted the
    first of those revisions away; returns (first revision, revision of the last write)."""
    async with EtcdClient(EtcdConfig(endpoints=endpoints, timeout=5.0)) as client:
        first = await client.put("/compaction-test/load", b"0")
        for i in range(1, 50):
            last = await client.put("/compaction-test/load", str(i).encode())
        deadline = time.monotonic() + timeout
        while True:
            try:
                await client.get_prefix("/compaction-test/", revision=first)
            except RevisionCompacted:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"revision {first} still readable after {timeout} s: nothing compacts")
            await client.put("/compaction-test/load", b"tick")  # compaction needs the revision to move on
            await asyncio.sleep(0.5)
        kvs, _ = await client.get_prefix("/compaction-test/")  # the current value is of course kept
        assert [kv.value for kv in kvs] in ([b"tick"], [b"49"])
        return first, last


async def test_an_embedded_etcd_with_auto_compaction_drops_old_revisions():
    with EmbeddedEtcd(unsafe_no_fsync=True, auto_compaction=AutoCompaction(mode="periodic", retention="1s")) as etcd:
        await _rewrite_then_wait_for_compaction(etcd.endpoints)


async def test_without_auto_compaction_every_revision_stays(etcd):
    # The fixtures' etcd (what watch tests use) keeps its whole history: compaction is opt-in per member.
    async with EtcdClient(EtcdConfig(endpoints=etcd.endpoints, timeout=5.0)) as client:
        first = await client.put("/compaction-test/load", b"0")
        for i in range(20):
            await client.put("/compaction-test/load", str(i).encode())
        await asyncio.sleep(2.5)
        kvs, _ = await client.get_prefix("/compaction-test/", revision=first)
        assert [kv.value for kv in kvs] == [b"0"]


def test_distserve_etcd_compacts_by_default_and_takes_the_option(tmp_path):
    """`distserve etcd` runs etcd with DEFAULT_AUTO_COMPACTION unless told otherwise; --auto-compaction
    periodic:1s really compacts."""
    assert DEFAULT_AUTO_COMPACTION.args() == ["--auto-compaction-mode=periodic", "--auto-compaction-retention=10m"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distserve", "etcd", "--auto-compaction", "periodic:1s"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        assert "--auto-compaction-retention=1s" in _etcd_cmdline(tmp_path)
        asyncio.run(_rewrite_then_wait_for_compaction([url]))
    finally:
        _stop(proc)

    proc = subprocess.Popen([sys.executable, "-m", "distserve", "etcd"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("http://127.0.0.1:")
        cmdline = _etcd_cmdline(tmp_path)
        assert "--auto-compaction-mode=periodic" in cmdline and "--auto-compaction-retention=10m" in cmdline
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM `distserve etcd`: it stops its etcd (SIGTERM, SIGKILL after 10 s, which it says) and exits 0. The
    wait allows for that path on a loaded machine; past it, what the command printed is the failure's message."""
    proc.terminate()
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"distserve etcd still running 40 s after SIGTERM; stderr:\n{proc.communicate()[1]}") from None
    assert proc.returncode == 0, proc.stderr.read()


def _etcd_cmdline(tmp: Path) -> str:
    """Command line of the etcd whose data directory is under `tmp`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"--data-dir={tmp}" in cmdline:
            return cmdline
    raise AssertionError(f"no etcd with a data directory under {tmp}")


@pytest.mark.parametrize(("text", "reason"), [
    ("periodic", "use periodic:DURATION"), ("hourly:1h", "use periodic:DURATION"),
    ("periodic:0s", "1s to 168h"), ("periodic:200h", "1s to 168h"), ("periodic:10 minutes", "a duration like"),
    ("revision:0", "integer 1-"), ("revision:-5", "integer 1-"), ("revision:1e3", "integer 1-"),
])
def test_bad_auto_compaction_settings_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        AutoCompaction.parse(text)
    assert "\n" not in str(refused.value)


def test_good_auto_compaction_settings():
    assert AutoCompaction.parse("off") is None
    assert AutoCompaction.parse("revision:10000").args() == ["--auto-compaction-mode=revision",
                                                             "--auto-compaction-retention=10000"]
    assert str(AutoCompaction.parse("periodic:1h30m")) == "periodic:1h30m"
