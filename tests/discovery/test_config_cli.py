"""EtcdConfig from options and DISTSERVE_ETCD* variables; `distserve etcd` as a real process."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from discovery.client import EtcdClient
from discovery.config import EtcdConfig, config_error_message
from tests.util import Proc


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    EtcdConfig.add_arguments(parser)
    return parser.parse_args(argv)


def test_env_vars_and_options_win_over_them(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    env = {
        "DISTSERVE_ETCD_ENDPOINTS": "https://10.0.0.1:2379, 10.0.0.2:2379",
        "DISTSERVE_ETCD_CA": str(ca),
        "DISTSERVE_ETCD_USER": "agent",
        "DISTSERVE_ETCD_PASSWORD": "hunter2",
        "DISTSERVE_ETCD_TIMEOUT": "2.5",
    }
    cfg = EtcdConfig.from_env(env)
    assert cfg.endpoints == ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert cfg.tls and cfg.user == "agent" and cfg.password.get_secret_value() == "hunter2" and cfg.timeout == 2.5
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg) and "hunter2" not in cfg.describe()
    cfg = EtcdConfig.from_args(_parse(["--etcd", "http://127.0.0.1:1,http://127.0.0.1:2", "--etcd-timeout", "1"]), env)
    assert cfg.endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"] and cfg.timeout == 1.0
    assert cfg.user == "agent"  # not given as an option: the variable still applies
    assert EtcdConfig.from_args(_parse([]), {}).endpoints == ["http://127.0.0.1:2379"]


@pytest.mark.parametrize("kwargs, message", [
    ({"endpoints": "ftp://x:1"}, "scheme"),
    ({"endpoints": "http://x:99999"}, "port"),
    ({"endpoints": ""}, "endpoints"),
    ({"cert": "/nonexistent.pem", "key": "/nonexistent.key"}, "no such file"),
    ({"cert": __file__}, "both cert and key"),
    ({"password": "p"}, "needs a user"),
    ({"timeout": 0}, "> 0"),
])
def test_bad_configuration_gets_a_one_line_error(kwargs, message):
    with pytest.raises(ValidationError) as info:
        EtcdConfig(**kwargs)
    line = config_error_message(info.value)
    assert message in line and "\n" not in line


def test_distserve_etcd_command_serves_and_stops_cleanly():
    proc = Proc.python(["distserve", "etcd"], name="distserve-etcd")
    try:
        deadline = time.monotonic() + 30
        while "\n" not in proc.output() and time.monotonic() < deadline:
            assert proc.alive(), proc.output()
            time.sleep(0.05)
        url = proc.output().splitlines()[0]
        assert url.startswith("http://127.0.0.1:")

        async def use() -> bytes:
            async with EtcdClient(EtcdConfig(endpoints=url, timeout=5)) as client:
                await client.put("/cmd/k", b"v")
                return (await client.get("/cmd/k")).value

        assert asyncio.run(use()) == b"v"
        deadline = time.monotonic() + 10
        while "data dir: " not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        data_dir = Path(proc.output().split("data dir: ", 1)[1].split(" (", 1)[0])
        assert data_dir.is_dir()
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(15) == 0
        assert not data_dir.exists()  # the temporary data dir is removed on a clean stop
        # the etcd child is gone too: its port refuses connections
        port = int(url.rsplit(":", 1)[1])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        proc.kill()


def test_distserve_etcd_rejects_a_wildcard_host_in_one_line():
    proc = Proc.python(["distserve", "etcd", "--host", "0.0.0.0"], name="distserve-etcd-bad")
    assert proc.popen.wait(30) == 2
    out = proc.output().strip()
    assert out.startswith("distserve etcd:") and len(out.splitlines()) == 1 and "Traceback" not in out


def _start_cmd(*args: str) -> tuple[Proc, str]:
    proc = Proc.python(["distserve", "etcd", *args], name="distserve-etcd")
    deadline = time.monotonic() + 30
    while "data dir: " not in proc.output() and time.monotonic() < deadline:
        assert proc.alive(), proc.output()
        time.sleep(0.05)
    return proc, proc.output().splitlines()[0]


def test_distserve_etcd_three_members_with_a_kept_data_dir(tmp_path: Path):
    """--cluster-size 3 prints three URLs; --data-dir keeps the data and the ports across runs."""

    async def put_then_get(url: str, value: bytes | None) -> bytes | None:
        async with EtcdClient(EtcdConfig(endpoints=url, timeout=5)) as client:
            if value is not None:
                await client.put("/kept", value)
            kv = await client.get("/kept")
            return kv.value if kv else None

    for run in range(2):
        proc, urls = _start_cmd("--cluster-size", "3", "--data-dir", str(tmp_path))
        try:
            assert len(urls.split(",")) == 3
            if run == 0:
                first_urls = urls
                assert asyncio.run(put_then_get(urls, b"survives")) == b"survives"
            else:
                assert urls == first_urls  # same ports: the members find each other again
                assert asyncio.run(put_then_get(urls, None)) == b"survives"
            proc.signal(signal.SIGINT)
            assert proc.popen.wait(20) == 0
        finally:
            proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "m2"]
