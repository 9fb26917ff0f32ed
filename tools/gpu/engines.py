"""Helpers for the GPU scripts: start lmdeploy api_servers through distserve's launcher, talk to them.

Synchronous on purpose (urllib): these scripts drive a handful of requests in order, and greedy
Hybrid-vs-PD comparisons need requests one at a time anyway (same batch shapes, same kernels).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


class ProbeError(RuntimeError):
    pass


@dataclass
class Engine:
    role: str
    port: int
    proc: subprocess.Popen
    log_path: str
    url: str = field(init=False)

    def __post_init__(self):
        self.url = f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_engine(
    model: str,
    role: str,
    port: int,
    log_path: str,
    cache: float = 0.05,
    extra: list[str] | None = None,
    env: dict | None = None,
) -> Engine:
    """`python -m distserve.lmdeploy_ext.serve api_server MODEL --role ROLE` in its own process group."""
    cmd = [
        sys.executable,
        "-m",
        "distserve.lmdeploy_ext.serve",
        "api_server",
        model,
        "--backend",
        "pytorch",
        "--role",
        role,
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--cache-max-entry-count",
        str(cache),
        "--eager-mode",
        "--model-name",
        "tiny",
        "--max-batch-size",
        "16",
        "--session-len",
        "4096",
        "--log-level",
        "INFO",
        *(extra or []),
    ]
    log = open(log_path, "ab", buffering=0)
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return Engine(role, port, proc, log_path)


def http(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_healthy(engines: list[Engine], timeout: float) -> None:
    deadline = time.time() + timeout
    pending = list(engines)
    while pending:
        for e in list(pending):
            if not e.alive():
                raise ProbeError(f"{e.role} engine exited with {e.proc.returncode}; see {e.log_path}")
            try:
                status, _ = http("GET", e.url + "/health", timeout=2)
                if status == 200:
                    pending.remove(e)
            except OSError:
                pass
        if time.time() > deadline:
            raise ProbeError(f"engines not healthy after {timeout}s: {[e.role for e in pending]}")
        time.sleep(1)


def engine_info(e: Engine) -> dict:
    status, body = http("GET", e.url + "/distserve/engine_info")
    if status != 200:
        raise ProbeError(f"engine_info on {e.role}: {status} {body}")
    while isinstance(body, str):
        body = json.loads(body)
    return body


def handshake(p: Engine, d: Engine, protocol: int = 1) -> dict:
    """lmdeploy's connection warmup for one (P, D) pair, as its proxy does it."""
    pi, di = engine_info(p), engine_info(d)
    t0 = time.time()
    init = {}
    for local, remote, linfo, rinfo in ((p, d, pi, di), (d, p, di, pi)):
        body = {
            "local_engine_id": local.url,
            "local_engine_config": linfo,
            "remote_engine_id": remote.url,
            "remote_engine_config": rinfo,
            "protocol": protocol,
            "rdma_config": {"with_gdr": True, "link_type": 2},
        }
        status, ans = http("POST", local.url + "/distserve/p2p_initialize", body)
        if status != 200 or ans.get("status") != 1:
            raise ProbeError(f"p2p_initialize on {local.role}: {status} {ans}")
        init[local.role] = ans
    for local, remote in ((p, d), (d, p)):
        body = {
            "protocol": protocol,
            "remote_engine_id": remote.url,
            "remote_engine_endpoint_info": init[remote.role]["engine_endpoint_info"],
            "remote_kvtransfer_endpoint_info": init[remote.role]["kvtransfer_endpoint_info"],
        }
        status, ans = http("POST", local.url + "/distserve/p2p_connect", body)
        if status != 200 or ans.get("status") != 1:
            raise ProbeError(f"p2p_connect on {local.role}: {status} {ans}")
    return {"prefill_info": pi, "decode_info": di, "init": init, "handshake_s": time.time() - t0}


def ext_status(e: Engine) -> dict:
    status, body = http("GET", e.url + "/distserve/ext/status")
    if status != 200:
        raise ProbeError(f"/distserve/ext/status on {e.role}: {status} {body}")
    return body


def greedy(body: dict) -> dict:
    return {**body, "temperature": 1.0, "top_k": 1, "top_p": 1.0}


def pd_request(p: Engine, d: Engine, path: str, body: dict, protocol: int = 1) -> tuple[dict, dict]:
    """One PD request by hand (what a router does): prefill with_cache, then decode with migration_request."""
    pre = {**body, "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
    if path.endswith("chat/completions"):
        pre["max_completion_tokens"] = 1
    status, ans = http("POST", p.url + path, pre)
    if status != 200:
        raise ProbeError(f"prefill {path}: {status} {ans}")
    if "remote_session_id" not in ans:
        raise ProbeError(f"prefill answer has no remote_session_id: {ans}")
    mig = {
        "protocol": protocol,
        "remote_engine_id": p.url,
        "remote_session_id": ans["remote_session_id"],
        "remote_token_id": ans["remote_token_ids"][-1],
        "remote_block_ids": ans["cache_block_ids"],
        "is_dummy_prefill": False,
    }
    status, out = http("POST", d.url + path, {**body, "migration_request": mig}, timeout=120)
    if status != 200:
        raise ProbeError(f"decode {path}: {status} {out}")
    return ans, out
