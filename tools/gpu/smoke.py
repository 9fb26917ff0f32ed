"""GPU smoke: stock lmdeploy engines through distserve, token-exact against a Hybrid engine.

On one GPU machine, nothing downloaded: build the tiny model; start an embedded etcd; start Hybrid,
Prefill and Decode lmdeploy api_servers on the same GPU through `python -m distserve.lmdeploy_ext.serve`
(staged-TCP KV migration over DLSlime, remote_session_id in prefill answers); a `distserve agent`
sidecar for Prefill and Decode; two `distserve router`s. Then:

1. wait for the prefill->decode link in etcd (established before any request);
2. through both routers, with the official openai client: completions and chat completions, stream and
   not, greedy; compare each with the Hybrid engine (text; chat also token ids via return_token_ids);
3. 16 concurrent PD requests (the stock proxy's KeyError case) all succeed;
4. the prefill engine's live sessions return to zero and its free KV blocks to their starting count;
5. SIGKILL a router, restart it, send through it: no new handshake (engines' p2p_initialize count and
   the link record unchanged).
Prints a summary and exits 0 only if every check held. Writes summary.json (with the versions that ran)
and logs.tgz to --out. With --lmdeploy-version V, also checks that all three engines report lmdeploy V.

    python tools/gpu/smoke.py --out DIR [--lmdeploy-version 0.17.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import (  # noqa: E402
    ProbeError,
    engine_info,
    ext_status,
    greedy,
    http,
    start_engine,
    wait_healthy,
)

from distserve.testing.ports import free_port  # noqa: E402

PROMPTS = [
    "the prefill engine reads a block",
    "river mountain cloud stone light",
    "one two three four five six seven",
    "alpha beta gamma delta omega " * 30,
]
MAX_TOKENS = 24
MODEL = "tiny"  # --model-name of the engines


class Cluster:
    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab", buffering=0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "distserve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name, signal.SIGTERM)
            except Exception:  # noqa: BLE001
                self.kill(name, signal.SIGKILL)


def etcd_links(endpoints: list[str]) -> dict[str, dict]:
    from discovery.client import EtcdClient
    from discovery.config import EtcdConfig
    from distserve.cluster.keys import Keys

    async def run():
        async with EtcdClient(EtcdConfig(endpoints=endpoints)) as client:
            kvs, _ = await client.get_prefix(Keys().prefix("links"))
            return {kv.key: {**json.loads(kv.value), "_mod_revision": kv.mod_revision} for kv in kvs}

    return asyncio.run(run())


def wait_for(what: str, fn, timeout: float, interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise ProbeError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def router_ready(url: str) -> bool:
    status, body = http("GET", url + "/health/ready", timeout=3)
    return status == 200 and body.get("prefill", 0) >= 1 and body.get("decode", 0) >= 1


def hybrid_reference(hybrid_url: str) -> dict:
    ref = {}
    for prompt in PROMPTS:
        body = greedy({"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS})
        status, ans = http("POST", hybrid_url + "/v1/completions", body)
        if status != 200:
            raise ProbeError(f"hybrid completion: {status} {ans}")
        ref[("completion", prompt)] = {"text": ans["choices"][0]["text"]}
        body = greedy(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": MAX_TOKENS,
                "return_token_ids": True,
            }
        )
        status, ans = http("POST", hybrid_url + "/v1/chat/completions", body)
        if status != 200:
            raise ProbeError(f"hybrid chat: {status} {ans}")
        ref[("chat", prompt)] = {
            "text": ans["choices"][0]["message"]["content"],
            "output_ids": ans["choices"][0].get("output_ids"),
        }
    return ref


def through_router(router_url: str, ref: dict) -> list[dict]:
    """Every prompt x {completion, chat} x {stream, not} through one router with the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=router_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    extra = {"top_k": 1}
    out = []
    for prompt in PROMPTS:
        for stream in (False, True):
            want = ref[("completion", prompt)]
            if stream:
                text = "".join(
                    c.choices[0].text
                    for c in client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=MAX_TOKENS,
                        temperature=1.0,
                        top_p=1.0,
                        stream=True,
                        extra_body=extra,
                    )
                    if c.choices
                )
            else:
                text = (
                    client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=MAX_TOKENS,
                        temperature=1.0,
                        top_p=1.0,
                        extra_body=extra,
                    )
                    .choices[0]
                    .text
                )
            out.append(
                {
                    "router": router_url,
                    "kind": "completion",
                    "stream": stream,
                    "prompt": prompt[:40],
                    "equal": text == want["text"],
                    "got": text,
                    "want": want["text"],
                }
            )
            want = ref[("chat", prompt)]
            messages = [{"role": "user", "content": prompt}]
            ids = None
            if stream:
                text = "".join(
                    (c.choices[0].delta.content or "")
                    for c in client.chat.completions.create(
                        model=MODEL,
                        messages=messages,
                        max_tokens=MAX_TOKENS,
                        temperature=1.0,
                        top_p=1.0,
                        stream=True,
                        extra_body=extra,
                    )
                    if c.choices
                )
                equal = text == want["text"]
            else:
                resp = client.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    max_tokens=MAX_TOKENS,
                    temperature=1.0,
                    top_p=1.0,
                    extra_body={**extra, "return_token_ids": True},
                )
                text = resp.choices[0].message.content
                ids = resp.model_dump()["choices"][0].get("output_ids")
                equal = text == want["text"] and ids == want["output_ids"] and ids is not None
            out.append(
                {
                    "router": router_url,
                    "kind": "chat",
                    "stream": stream,
                    "prompt": prompt[:40],
                    "equal": equal,
                    "got": text,
                    "want": want["text"],
                    "output_ids": ids,
                    "want_ids": want["output_ids"] if not stream else None,
                }
            )
    return out


def concurrent_burst(routers: list[str], n: int = 16) -> list[int]:
    def one(i: int) -> int:
        url = routers[i % len(routers)]
        if i % 2:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": PROMPTS[i % 3] + f" {i}"}],
                "max_tokens": 12,
            }
            return http("POST", url + "/v1/chat/completions", body, timeout=120)[0]
        body = {"model": MODEL, "prompt": PROMPTS[i % 3] + f" {i}", "max_tokens": 12}
        return http("POST", url + "/v1/completions", body, timeout=120)[0]

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def installed_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("lmdeploy", "dlslime", "torch", "transformers", "triton", "fastapi", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _terminated(signum, frame):
    # `timeout` sends SIGTERM: fail through the normal path, so engines are stopped and the summary written.
    raise ProbeError(f"terminated by signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/distserve-tiny")
    ap.add_argument("--lmdeploy-version", help="fail unless every engine reports this lmdeploy version")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="distserve-smoke-logs-"))  # one per run: runs can follow each other
    signal.signal(signal.SIGTERM, _terminated)
    t0 = time.time()
    checks: list[dict] = []
    summary: dict = {"checks": checks, "versions": installed_versions()}
    print(f"[smoke] versions: {json.dumps(summary['versions'])}", flush=True)

    def check(name: str, ok: bool, **detail) -> bool:
        checks.append({"check": name, "ok": bool(ok), **detail})
        print(
            f"[smoke {time.time() - t0:6.1f}s] {'PASS' if ok else 'FAIL'} {name} {json.dumps(detail)[:300]}",
            flush=True,
        )
        return ok

    cluster = Cluster(logs)
    engines = []
    etcd = None
    try:
        from discovery.embedded import EmbeddedEtcd

        if not Path(a.model, "config.json").exists():
            subprocess.run(
                [sys.executable, str(Path(__file__).parent / "make_tiny_model.py"), a.model], check=True
            )
        etcd = EmbeddedEtcd()
        etcd.start()
        endpoints = ",".join(etcd.endpoints)
        check("embedded etcd", True, endpoints=endpoints)

        ports = {role: free_port() for role in ("Hybrid", "Prefill", "Decode")}
        for role, port in ports.items():
            engines.append(start_engine(a.model, role, port, str(logs / f"lmdeploy-{role.lower()}.log")))
        hybrid, prefill, decode = engines
        wait_healthy(engines, 420)
        check("three lmdeploy engines healthy on one GPU", True, ports=ports)
        reported = {e.role: engine_info(e).get("software_version") for e in engines}
        summary["engine_software"] = reported
        if a.lmdeploy_version:
            check(
                f"all engines run lmdeploy {a.lmdeploy_version}",
                all(f"lmdeploy {a.lmdeploy_version} " in (v or "") for v in reported.values()),
                reported=reported,
            )

        for e in (prefill, decode):
            cluster.spawn(
                f"agent-{e.role.lower()}",
                ["agent", "--engine-url", e.url, "--role", e.role.lower(), "--etcd", endpoints],
            )
        router_ports = [free_port(), free_port()]
        routers = [f"http://127.0.0.1:{p}" for p in router_ports]
        for i, port in enumerate(router_ports):
            cluster.spawn(f"router-{i}", ["router", "--port", str(port), "--etcd", endpoints])

        links = wait_for(
            "an established link in etcd",
            lambda: {k: v for k, v in etcd_links(etcd.endpoints).items() if v.get("state") == "established"},
            150,
        )
        check(
            "link established in etcd before any request",
            len(links) == 1,
            links={k: {f: v.get(f) for f in ("protocol", "handshake_ms", "state")} for k, v in links.items()},
        )
        for r in routers:
            wait_for(f"router {r} ready", lambda r=r: router_ready(r), 60)
        check("both routers ready", True, routers=routers)

        status_p0 = ext_status(prefill)
        handshakes0 = status_p0["handshakes"] + ext_status(decode)["handshakes"]
        check("handshakes done by the agents before traffic", handshakes0 >= 2, handshakes=handshakes0)

        ref = hybrid_reference(hybrid.url)
        results = []
        for r in routers:
            results.extend(through_router(r, ref))
        summary["results"] = results
        bad = [x for x in results if not x["equal"]]
        check(
            f"greedy PD == Hybrid through both routers ({len(results)} requests: completions and chat, "
            "stream and not; chat token ids)",
            not bad and len(results) == 2 * len(PROMPTS) * 4,
            mismatches=bad[:3],
        )

        mig = ext_status(decode)["migration"]
        check(
            "every PD request migrated KV over the staged-TCP path",
            mig["migrations"] >= len(results) and mig["failures"] == 0,
            migration=mig,
        )

        statuses = concurrent_burst(routers)
        check(
            "16 concurrent PD requests through both routers",
            all(s == 200 for s in statuses),
            statuses=statuses,
        )

        def drained():
            s = ext_status(prefill)
            return s if s["sessions"] == 0 and s["free_gpu_blocks"] == status_p0["free_gpu_blocks"] else None

        try:
            final = wait_for("prefill sessions back to zero", drained, 30)
        except ProbeError:
            final = ext_status(prefill)
        check(
            "prefill engine sessions return to zero (no preserved-KV leak)",
            final["sessions"] == 0 and final["free_gpu_blocks"] == status_p0["free_gpu_blocks"],
            sessions=final["sessions"],
            free_gpu_blocks=final["free_gpu_blocks"],
            free_at_start=status_p0["free_gpu_blocks"],
            num_gpu_blocks=final.get("num_gpu_blocks"),
            api_sessions=final.get("api_sessions"),
        )

        links_before = etcd_links(etcd.endpoints)
        cluster.kill("router-0", signal.SIGKILL)
        cluster.spawn("router-0", ["router", "--port", str(router_ports[0]), "--etcd", endpoints])
        wait_for("restarted router ready", lambda: router_ready(routers[0]), 60)
        status, ans = http(
            "POST",
            routers[0] + "/v1/completions",
            greedy({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}),
        )
        same_answer = status == 200 and ans["choices"][0]["text"] == ref[("completion", PROMPTS[0])]["text"]
        handshakes1 = ext_status(prefill)["handshakes"] + ext_status(decode)["handshakes"]
        links_after = etcd_links(etcd.endpoints)
        stable = {k: (v.get("established_at"), v.get("handshake_ms")) for k, v in links_before.items()} == {
            k: (v.get("established_at"), v.get("handshake_ms")) for k, v in links_after.items()
        }
        check(
            "router SIGKILL + restart: serves again, no new handshake",
            same_answer and handshakes1 == handshakes0 and stable,
            handshakes_before=handshakes0,
            handshakes_after=handshakes1,
            link_unchanged=stable,
            status=status,
        )

        summary["decode_status"] = ext_status(decode)
        summary["prefill_status"] = ext_status(prefill)
        summary["seconds"] = round(time.time() - t0, 1)
    except Exception as e:  # noqa: BLE001 - the smoke reports everything
        check("smoke ran to the end", False, error=f"{type(e).__name__}: {e}")
        summary["traceback"] = traceback.format_exc()
        print(summary["traceback"], flush=True)
    finally:
        cluster.stop_all()
        for e in engines:
            e.stop()
        if etcd is not None:
            etcd.stop()
        summary["ok"] = bool(checks) and all(c["ok"] for c in checks)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        with tarfile.open(out / "logs.tgz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
    print(f"\nSUMMARY (lmdeploy {summary['versions'].get('lmdeploy')})")
    for c in checks:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['check']}")
    print(f"GPU SMOKE {'PASSED' if summary['ok'] else 'FAILED'} in {time.time() - t0:.0f}s", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
