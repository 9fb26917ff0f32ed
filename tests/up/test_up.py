"""`distserve up`: the local cluster as a user runs it (a real process tree: etcd, reference engines with
their agents, routers), driven only through its command line, its output and its signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.cluster.keys import Keys
from distserve.testing.ports import free_port_range
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

    def etcd_endpoints(self) -> list[str]:
        return re.findall(r"^  etcd\s+(http://\S+)", "".join(self.lines), re.M)

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


def test_router_workers_serve_the_smoke_test_and_stop_cleanly(tmp, cluster):
    out = subprocess.run([*UP, "--smoke", "--null", "--routers", "1", "--router-workers", "2", "--cluster", cluster],
                         cwd=REPO, env=run_env(tmp), capture_output=True, text=True, timeout=150)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    status = text.split("distserve-ctl status:", 1)[1]
    assert "router-0-w0" in status and "router-0-w1" in status, status
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


def pid_of(cluster: str, *markers: str) -> int:
    """The one live process of `cluster` whose command line has every marker."""
    found = [int(line.split(":", 1)[0]) for line in processes_with(f"--cluster {cluster}")
             if all(m in line for m in markers)]
    assert len(found) == 1, (markers, found)
    return found[0]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


class Completions(threading.Thread):
    """Completions through one router, one after another, until stopped; records every failure."""

    def __init__(self, router: str, model: str):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{router}/v1", api_key="none", timeout=30, max_retries=0)
        self.model, self.ok, self.failures = model, 0, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                done = self.client.completions.create(model=self.model, prompt="hi", max_tokens=4, temperature=0)
                assert done.usage.completion_tokens == 4
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                self.failures.append(repr(exc))
            time.sleep(0.05)

    def stop(self) -> tuple[int, list[str]]:
        self.halt.set()
        self.join(timeout=60)
        return self.ok, self.failures


def test_killed_components_are_restarted_while_the_rest_keeps_serving(tmp, cluster):
    # Routers wait for a routable engine up to 30 s, so a request that arrives while the only decode
    # engine restarts is held rather than refused.
    up = Up(["--cluster", cluster, "--null", "--router-args=--route-wait 30"], tmp)  # 1 prefill, 1 decode, 2 routers
    try:
        up.wait_for(r"Ctrl-C stops everything")
        router0, router1 = up.router_urls()
        steady = {name: pid_of(cluster, marker) for name, marker in
                  (("router-0", "--router-id router-0"), ("prefill-0", "--engine-id prefill-0"))}
        # The embedded etcd compacts its history (defect 11): same flags as `distserve etcd`.
        [etcd_line] = [line for line in processes_with(str(tmp)) if "--data-dir=" in line]
        etcd_flags = cmdline(int(etcd_line.split(":", 1)[0]))
        assert "--auto-compaction-mode=periodic" in etcd_flags and "--auto-compaction-retention=10m" in etcd_flags
        model = openai.OpenAI(base_url=f"{router0}/v1", api_key="none", max_retries=0).models.list().data[0].id
        traffic = Completions(router0, model)
        traffic.start()

        # A router dies: reported, restarted on its port, and router-0 serves every request meanwhile.
        os.kill(pid_of(cluster, "--router-id router-1"), signal.SIGKILL)
        up.wait_for(r"router-1 exited with code -9 after [\d.]+ s; restarting in [\d.]+ s")
        up.wait_for(r"restarted router-1 \(exit -9\), attempt 1, pid \d+")
        up.wait_for(r"router-1 +ready again +" + re.escape(router1))
        again = openai.OpenAI(base_url=f"{router1}/v1", api_key="none", timeout=30, max_retries=0)
        assert again.completions.create(model=model, prompt="hi", max_tokens=4).usage.completion_tokens == 4
        # It dies again right away: still restarted, as attempt 2, after a longer (growing) back-off.
        os.kill(pid_of(cluster, "--router-id router-1"), signal.SIGKILL)
        up.wait_for(r"router-1 exited with code -9")
        up.wait_for(r"restarted router-1 \(exit -9\), attempt 2")
        up.wait_for(r"router-1 +ready again")
        ok, failures = traffic.stop()
        assert failures == [] and ok >= 3, (ok, failures)
        delays = [float(d) for d in re.findall(r"router-1 exited .* restarting in ([\d.]+) s", "".join(up.lines))]
        assert len(delays) == 2 and 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0, delays

        # The decode engine (and its in-process agent) dies: restarted with the same id and port, its agent
        # re-registers it, and both routers serve through it again (the only decode engine: requests that
        # reach a router while it is down cannot be served, which is why production runs several).
        os.kill(pid_of(cluster, "--engine-id decode-0"), signal.SIGKILL)
        up.wait_for(r"decode-0 exited with code -9")
        up.wait_for(r"restarted decode-0 \(exit -9\), attempt 1")
        up.wait_for(r"decode-0 +ready again")
        for url in (router0, router1):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=30, max_retries=0)
            deadline = time.monotonic() + 30  # until the routers have seen the new registration and its link
            while True:
                try:
                    done = client.completions.create(model=model, prompt="hi", max_tokens=4, temperature=0)
                    break
                except openai.APIStatusError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert done.usage.completion_tokens == 4
            chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, temperature=0)
            assert chat.usage.completion_tokens == 4
        assert _kinds(up.etcd_endpoints(), Keys(cluster)) >= {"engines", "links", "load", "routers"}
        # What was not killed was never restarted.
        assert steady == {name: pid_of(cluster, marker) for name, marker in
                          (("router-0", "--router-id router-0"), ("prefill-0", "--engine-id prefill-0"))}

        os.killpg(up.proc.pid, signal.SIGINT)
        code, text = up.finish()
        assert code == 0 and "stopped cleanly" in text, text
        assert "failed" not in text, text
        assert_nothing_left(tmp, cluster)
    finally:
        up.kill()


def test_etcd_dying_stops_everything_with_the_reason(tmp, cluster):
    up = Up(["--cluster", cluster, "--null", "--routers", "1"], tmp)
    try:
        up.wait_for(r"Ctrl-C stops everything")
        [etcd_line] = [line for line in processes_with(str(tmp)) if "--data-dir=" in line]
        os.kill(int(etcd_line.split(":", 1)[0]), signal.SIGKILL)
        code, text = up.finish(timeout=90)
        assert code == 1, text
        assert re.search(r"failed: the embedded etcd exited with code -9; stopping everything", text), text
        assert not re.search(r"restarted \w+-\d+ \(exit", text), text
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


@pytest.mark.parametrize(("options", "message"), [
    (["--cluster", "bad/name"], "--cluster: invalid cluster name 'bad/name'"),
    (["--strategy", "bogus"], "--strategy 'bogus': unknown (choose from "),
    (["--routers", "0"], "--routers must be at least 1"),
    (["--router-workers", "0"], "--router-workers must be in 1-256"),
    (["--router-args=--workers 2"], "--router-args: --workers set by distserve up for each process"),
    (["--decode", "65"], "--decode must be at most 64"),
    (["--port", "65534"], "--port 65534: need 4 ports from BASE, within 1024-65535"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an IP address or a resolvable name"),
    (["--router-args=--route-wait 9999"], "--router-args: distserve router: --route-wait must be in 0-600 seconds"),
    (["--router-args=--no-such-option"], "--router-args: distserve router: unrecognized arguments: --no-such-option"),
    (["--engine-args=--num-blocks 1"], "--engine-args: distserve engine: bad model configuration: "),
    (["--engine-args=--ttl 0"], "--engine-args: distserve engine: invalid agent configuration: ttl"),
    (["--engine-args=--port 9000"], "--engine-args: --port set by distserve up for each process"),
    (["--router-args=--cluster other"], "--router-args: --cluster set by distserve up for each process"),
    (["--model-config", "/no/such/file.json"], "--model-config /no/such/file.json: no such file"),
    (["--api-keys", "a,b"], "--api-keys: a key must be non-empty, without spaces or commas"),
    (["--etcd-auto-compaction", "hourly"], "--etcd-auto-compaction 'hourly': use periodic:DURATION"),
    (["--etcd", "http://127.0.0.1:1", "--etcd-auto-compaction", "off"], "--etcd-auto-compaction applies to the embedded"),
    (["--etcd-user", "root"], "--etcd-user need --etcd"),
])
def test_every_bad_option_fails_in_one_line_before_anything_starts(tmp, cluster, options, message):
    started = time.monotonic()
    out = subprocess.run([*UP, "--cluster", cluster, *options], cwd=REPO, env=run_env(tmp), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith(f"distserve up: error: {message}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr and "usage:" not in out.stderr
    assert out.stdout == ""  # not even "starting": no etcd, no engine, no router, no log directory
    assert time.monotonic() - started < 10
    assert_nothing_left(tmp, cluster, within=0.0)


def test_smoke_twice_in_a_row_on_the_same_ports(tmp, cluster):
    """The first run's sockets linger in TIME_WAIT on the engines' and routers' ports; the servers bind
    anyway (SO_REUSEADDR), so the second run must not refuse to start."""
    base = free_port_range(4)
    for run in (1, 2):
        out = subprocess.run([sys.executable, "-m", "distserve", "up", "--smoke", "--null", "--port", str(base),
                              "--cluster", cluster], cwd=REPO, env=run_env(tmp), capture_output=True, text=True,
                             timeout=150)
        assert out.returncode == 0, f"run {run}:\n{out.stdout}{out.stderr}"
        assert "smoke test passed; stopped cleanly" in out.stdout
        assert f"router-0   ready  http://127.0.0.1:{base} " in out.stdout
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
