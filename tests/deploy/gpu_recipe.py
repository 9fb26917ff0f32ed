"""The bare-metal recipe of docs/deploy.md on a real GPU: the systemd units' own command lines, run.

Not a pytest test (it needs a GPU and lmdeploy, which CI has not): run it on a lent GPU machine,

    python3 tests/deploy/gpu_recipe.py --out DIR

It reads the ExecStart lines of deploy/systemd/{lmdeploy-engine,distserve-agent,distserve-router}@.service,
expands them as systemd would (the instance name, ${VAR} from the example environment files, with local
values for the host, ports, model, etcd and fresh secrets), and starts a prefill and a decode lmdeploy
engine (sharing the one GPU, so a small KV cache is appended to their command lines), their agents and two
routers on an embedded etcd. Then it checks what the docs promise:

1. every router becomes ready, and the prefill->decode link is in etcd before any request;
2. a completion and a streamed chat completion through each router with the official openai client and
   the client API key; a wrong key gets 401;
3. the engines refuse calls without the cluster token (401) and serve with it;
4. stopping an agent (as `systemctl stop` does, before its engine) removes its engine's record at once.

Writes summary.json (and the logs) to --out; exits 0 only if every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from distserve.testing.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
# One GPU holds both engines here (the docs give each engine its own GPU): a small KV pool of the same
# size on both (the agents link only pools of identical shape, block count included).
SHARED_GPU_ARGS = ["--num-gpu-blocks", "2048", "--eager-mode", "--session-len", "4096", "--max-batch-size", "16"]


def exec_start(unit: str) -> str:
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line.startswith("ExecStart="):
            return line[len("ExecStart="):]
    raise SystemExit(f"{unit}: no ExecStart")


def env_file(name: str) -> dict[str, str]:
    out = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def expand(command: str, instance: str, env: dict[str, str]) -> list[str]:
    command = command.replace("%i", instance).replace("%H", socket.gethostname()).replace("%%", "%")
    words = [re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], w) for w in shlex.split(command)]
    # The units' install paths, mapped to this machine's Python.
    if words[0].endswith("/bin/distserve"):
        return [sys.executable, "-m", "distserve", *words[1:]]
    if words[0].endswith("/bin/python"):
        return [sys.executable, *words[1:]]
    raise SystemExit(f"unexpected program {words[0]}")


def http(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]


def wait(what: str, fn, timeout: float, procs: dict[str, subprocess.Popen]):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}")
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not yet
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def etcd_kinds(endpoints: list[str]) -> dict[str, list[dict]]:
    from discovery.client import EtcdClient
    from discovery.config import EtcdConfig
    from distserve.cluster.keys import Keys

    async def run():
        keys = Keys()
        async with EtcdClient(EtcdConfig(endpoints=endpoints)) as client:
            kvs, _ = await client.get_prefix(keys.root)
        out: dict[str, list[dict]] = {}
        for kv in kvs:
            parsed = keys.parse(kv.key)
            if parsed:
                out.setdefault(parsed.kind, []).append(json.loads(kv.value))
        return out

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="print the expanded command lines and exit")
    args = parser.parse_args()
    if args.dry_run:
        env = {**env_file("distserve.env.example"), **env_file("engine-prefill-0.env.example")}
        for unit, instance in (("lmdeploy-engine@.service", "prefill-0"), ("distserve-agent@.service", "prefill-0"),
                               ("distserve-router@.service", "8000")):
            print(shlex.join(expand(exec_start(unit), instance, env)))
        return 0
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    summary: dict = {"checks": {}, "commands": {}}
    procs: dict[str, subprocess.Popen] = {}
    etcd = None

    def start(name: str, argv: list[str], env: dict[str, str]) -> None:
        secret_values = {env.get("DISTSERVE_CLUSTER_TOKEN"), env.get("DISTSERVE_API_KEYS")} - {None}
        summary["commands"][name] = shlex.join("<secret>" if a in secret_values else a for a in argv)
        log = open(logs / f"{name.replace('@', '-')}.log", "ab", buffering=0)  # noqa: SIM115 - closed at exit
        procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **env})

    def stop(name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        proc = procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(10)

    ok = False
    try:
        model = out / "tiny-model"
        subprocess.run([sys.executable, str(REPO / "tools/gpu/make_tiny_model.py"), str(model)], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        from discovery.embedded import EmbeddedEtcd

        etcd = EmbeddedEtcd(name="recipe").start()
        token, api_key = secrets.token_hex(32), "sk-" + secrets.token_hex(24)
        common = env_file("distserve.env.example")
        for var in ("DISTSERVE_ETCD_CA", "DISTSERVE_ETCD_CERT", "DISTSERVE_ETCD_KEY"):
            common.pop(var)  # the embedded etcd speaks plain HTTP on loopback
        common.update(DISTSERVE_ETCD_ENDPOINTS=etcd.client_url, DISTSERVE_CLUSTER_TOKEN=token,
                      DISTSERVE_API_KEYS=api_key, MODEL_PATH=str(model), MODEL_NAME="tiny")
        engines = {}
        for instance in ("prefill-0", "decode-0"):
            env = {**common, **env_file(f"engine-{instance}.env.example"), "ENGINE_HOST": "127.0.0.1",
                   "ENGINE_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": "0"}
            engines[instance] = env
            start(f"engine@{instance}", expand(exec_start("lmdeploy-engine@.service"), instance, env) + SHARED_GPU_ARGS, env)
            start(f"agent@{instance}", expand(exec_start("distserve-agent@.service"), instance, env), env)
        routers = []
        for _ in range(2):
            port = str(free_port())
            start(f"router@{port}", expand(exec_start("distserve-router@.service"), port, common), common)
            routers.append(f"http://127.0.0.1:{port}")
        # The routers listen on 0.0.0.0 in the unit; here they are reached on loopback.

        def all_ready():
            return all(http(url + "/health/ready")[0] == 200 for url in routers)

        started = time.time()
        wait("routers ready", all_ready, 420, procs)
        summary["ready_after_s"] = round(time.time() - started, 1)
        state = etcd_kinds(etcd.endpoints)
        links = state.get("links", [])
        summary["checks"]["link_established_before_traffic"] = (
            len(links) == 1 and links[0]["state"] == "established", links)

        from openai import AuthenticationError, OpenAI

        answers = {}
        for url in routers:
            client = OpenAI(base_url=url + "/v1", api_key=api_key, timeout=120, max_retries=0)
            comp = client.completions.create(model="tiny", prompt="the prefill engine reads a block",
                                             max_tokens=16, temperature=0)
            stream = client.chat.completions.create(model="tiny", max_tokens=16, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": "river mountain"}])
            chat, finish = "", None
            for chunk in stream:
                for choice in chunk.choices:
                    chat += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            answers[url] = {"completion": comp.choices[0].text, "tokens": comp.usage.completion_tokens,
                            "chat": chat, "finish": finish}
        summary["answers"] = answers
        summary["checks"]["pd_through_every_router"] = (
            all(a["tokens"] == 16 and a["finish"] for a in answers.values())
            and len({(a["completion"], a["chat"]) for a in answers.values()}) == 1, answers)
        try:
            OpenAI(base_url=routers[0] + "/v1", api_key="wrong", max_retries=0).models.list()
            summary["checks"]["wrong_client_key_refused"] = (False, "accepted")
        except AuthenticationError:
            summary["checks"]["wrong_client_key_refused"] = (True, 401)
        for instance, env in engines.items():
            url = f"http://{env['ENGINE_HOST']}:{env['ENGINE_PORT']}/v1/models"
            without, with_token = http(url)[0], http(url, token)[0]
            summary["checks"][f"{instance}_needs_the_cluster_token"] = (without == 401 and with_token == 200,
                                                                        {"without": without, "with": with_token})
        # systemctl stop lmdeploy-engine@prefill-0 stops the agent first (it is ordered after the engine).
        before = {e["id"] for e in etcd_kinds(etcd.endpoints).get("engines", [])}
        t0 = time.time()
        code = stop("agent@prefill-0")
        after = {e["id"] for e in etcd_kinds(etcd.endpoints).get("engines", [])}
        gone = before - after
        summary["checks"]["agent_stop_deregisters_at_once"] = (
            code == 0 and gone == {f"{socket.gethostname()}-prefill-0"},
            {"before": sorted(before), "after": sorted(after), "seconds": round(time.time() - t0, 2), "code": code})
        ok = all(v[0] for v in summary["checks"].values())
    except Exception as exc:  # noqa: BLE001 - reported in the summary
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()
    finally:
        for name in [n for n in procs if n.startswith("router")] + [n for n in procs if n.startswith("agent")] + list(procs):
            stop(name)
        if etcd is not None:
            etcd.stop()
        summary["ok"] = ok
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        print(json.dumps({k: v for k, v in summary.items() if k != "traceback"}, indent=1, default=str)[:6000])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
