"""`distserve up`: the local cluster as a user runs it (a real process tree: etcd, reference engines with
their agents, routers), driven only through its command line, its output and its signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.keys import Keys
from tests.util import REPO

UP = [sys.executable, "-m", "distserve", "up", "--port", "0"]


def run_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTSERVE_")}
    env["TMPDIR"] = str(tmp)  # every temporary file or directory `up` makes lands here, so leftovers show
    env["PYTHONUNBUFFERED"] = "1"
    return env


def processes_with(*markers: str) -> list[str]:
    """Command lines of live processes mentioning any marker (zombies excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(m in cmdline for m in markers):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def assert_nothing_left(tmp: Path, cluster: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        left = processes_with(f"--cluster {cluster}", str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        if not left and not files:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {left}, files in TMPDIR {files}")
        time.sleep(0.1)


class Up:
    """`distserve up` in the background, its output read line by line."""

    def __init__(self, args: list[str], tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen([*UP, *args], cwd=REPO, env=run_env(tmp), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out

    def router_urls(self) -> list[str]:
        return re.findall(r"^  router-\d+\s+(http://\S+)\s+\(OpenAI", "".join(self.lines), re.M)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def tmp(tmp_path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def cluster() -> str:
    return f"up-{uuid.uuid4().hex[:8]}"


def test_smoke_runs_both_calls_through_every_router_and_stops_cleanly(tmp, cluster):
    out = subprocess.run([*UP, "--smoke", "--cluster", cluster], cwd=REPO, env=run_env(tmp),
                         capture_output=True, text=True, timeout=150)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for router in ("router-0", "router-1"):
        assert re.search(rf"{router} completion .* -> .*\(length, 16 tokens\)", text), text
        assert re.search(rf"{router} chat stream .* -> .*chunks\)", text), text
    assert re.search(r"distserve-ctl --etcd http://127\.0\.0\.1:\d+ --cluster " + cluster + " status", text)
    status = text.split("distserve-ctl status:", 1)[1]
    assert "prefill" in status and "decode" in status and "router-0" in status
    assert "smoke test passed; stopped cleanly" in text
    assert_nothing_left(tmp, cluster)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stop_signal_revokes_every_lease_at_once_on_an_external_etcd(etcd, tmp, cluster, how):
    up = Up(["--etcd", etcd.client_url, "--cluster", cluster, "--prefill", "2", "--routers", "1",
             "--api-keys", "sk-test-key"], tmp)
    try:
        up.wait_for(r"Ctrl-C stops everything")
        [router] = up.router_urls()
        client = openai.OpenAI(base_url=f"{router}/v1", api_key="sk-test-key", timeout=30, max_retries=0)
        model = client.models.list().data[0].id
        assert client.completions.create(model=model, prompt="hi", max_tokens=4, temperature=0).usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):  # --api-keys reached the routers
            openai.OpenAI(base_url=f"{router}/v1", api_key="wrong", max_retries=0).models.list()
        # The engines answer only the run's random cluster token, which the client key is not.
        engines = re.findall(r"^  (?:prefill|decode)-\d+\s+(http://\S+)", "".join(up.lines), re.M)
        assert len(engines) == 3
        for url in engines:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers={
                    "Authorization": "Bearer sk-test-key"}), timeout=10)
            assert refused.value.code == 401
        keys = Keys(cluster)
        held = sorted(_kinds(etcd.endpoints, keys))
        assert held == ["engines", "links", "load", "routers"], held
        if how == "ctrl-c":  # a terminal sends SIGINT to the whole foreground process group
            os.killpg(up.proc.pid, signal.SIGINT)
        else:
            up.proc.send_signal(signal.SIGTERM)
        code, text = up.finish()
        # Agents hold a 5 s lease and routers a 10 s one: keys gone right after exit means revoked, not expired.
        assert _kinds(etcd.endpoints, keys) == set(), text
        assert code == 0 and "stopped cleanly" in text, text
        assert_nothing_left(tmp, cluster)
        assert etcd.alive()  # an external etcd is left running
    finally:
        up.kill()


def _kinds(endpoints: list[str], keys: Keys) -> set[str]:
    import asyncio

    async def read():
        async with EtcdClient(EtcdConfig(endpoints=endpoints)) as client:
            kvs, _ = await client.get_prefix(keys.root)
        return {keys.parse(kv.key).kind for kv in kvs if keys.parse(kv.key)}

    return asyncio.run(read())


def test_a_crashed_component_stops_the_cluster_with_the_reason(tmp, cluster):
    up = Up(["--cluster", cluster, "--routers", "1"], tmp)
    try:
        up.wait_for(r"Ctrl-C stops everything")
        [decode] = [line.split(":", 1)[0] for line in processes_with(f"--cluster {cluster}") if "--role decode" in line]
        os.kill(int(decode), signal.SIGKILL)
        code, text = up.finish(timeout=60)
        assert code == 1
        assert re.search(r"failed: decode-0 exited with code -9", text), text
        assert_nothing_left(tmp, cluster)
    finally:
        up.kill()


def test_sigkill_of_up_itself_leaves_no_process_and_no_data_directory(tmp, cluster):
    up = Up(["--cluster", cluster, "--routers", "1"], tmp)
    try:
        up.wait_for(r"Ctrl-C stops everything")
        assert any("distserve-etcd-" in p.name for p in tmp.iterdir())
        os.kill(up.proc.pid, signal.SIGKILL)  # only `up`: its children must notice by themselves
        up.proc.wait()
        assert_nothing_left(tmp, cluster, within=30.0)
    finally:
        up.kill()


def test_bad_options_and_a_busy_port_fail_in_one_line(tmp, cluster):
    out = subprocess.run([*UP, "--prefill", "0"], cwd=REPO, env=run_env(tmp), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == "distserve up: error: --prefill must be at least 1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "distserve", "up", "--port", str(port), "--cluster", cluster],
                             cwd=REPO, env=run_env(tmp), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert_nothing_left(tmp, cluster)


def test_ctrl_c_while_starting_stops_what_was_started(tmp, cluster):
    up = Up(["--cluster", cluster], tmp)
    try:
        up.wait_for(r"starting 1 prefill")
        time.sleep(0.5)  # etcd is up, the engines and routers are on their way
        os.killpg(up.proc.pid, signal.SIGINT)
        code, text = up.finish()
        assert code == 130, text
        assert "interrupted before the cluster was ready; stopped cleanly" in text
        assert_nothing_left(tmp, cluster)
    finally:
        up.kill()
