"""Exploratory GPU probe: lmdeploy Hybrid, Prefill and Decode engines on one GPU, PD by hand.

Checks the environment, builds the tiny model, starts the three engines through distserve's launcher,
does the handshake with protocol TCP (distserve's staged-TCP backend), sends greedy completions and
chat completions through P -> D and compares them with the Hybrid engine, checks `remote_session_id`
and that the prefill's sessions return to zero. Writes a JSON report.

    python tools/gpu/probe.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import ext_status, greedy, handshake, http, pd_request, start_engine, wait_healthy  # noqa: E402

PROMPTS = ["the prefill engine reads a block", "river mountain cloud stone", "one two three four five six"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "lmdeploy", "dlslime", "fastapi", "pydantic", "triton", "xgrammar"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"ERROR {type(e).__name__}: {e}"
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        out["gpu"] = f"ERROR {e}"
    try:
        import dlslime._slime_c as c

        out["dlslime_build"] = {k: getattr(c, k) for k in dir(c) if k.startswith("_BUILD")}
    except Exception as e:  # noqa: BLE001
        out["dlslime_build"] = f"ERROR {e}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/distserve-tiny")
    a = ap.parse_args()
    out = Path(a.out)
    report: dict = {"ok": False, "steps": []}

    def step(name, **kv):
        report["steps"].append({"step": name, "t": round(time.time() - t0, 1), **kv})
        print(f"[probe {time.time() - t0:6.1f}s] {name} {json.dumps(kv)[:400]}", flush=True)

    t0 = time.time()
    engines = []
    try:
        report["versions"] = versions()
        step("versions", **report["versions"])
        subprocess.run(
            [sys.executable, str(Path(__file__).parent / "make_tiny_model.py"), a.model], check=True
        )
        step("tiny model built")
        ports = {"Hybrid": 23401, "Prefill": 23402, "Decode": 23403}
        for role, port in ports.items():
            engines.append(start_engine(a.model, role, port, str(out / f"{role.lower()}.log")))
        hy, p, d = engines
        wait_healthy(engines, 400)
        step("engines healthy")
        hs = handshake(p, d, protocol=1)
        step(
            "handshake",
            handshake_s=round(hs["handshake_s"], 3),
            prefill_info=hs["prefill_info"],
            kv=hs["init"]["Prefill"]["kvtransfer_endpoint_info"][0].get("cache_pools"),
        )
        results = []
        for prompt in PROMPTS:
            body = greedy({"model": "tiny", "prompt": prompt, "max_tokens": 24})
            _, href = http("POST", hy.url + "/v1/completions", body)
            pre, pdo = pd_request(p, d, "/v1/completions", body)
            results.append(
                {
                    "kind": "completion",
                    "prompt": prompt,
                    "hybrid": href["choices"][0]["text"],
                    "pd": pdo["choices"][0]["text"],
                    "remote_session_id": pre["remote_session_id"],
                    "blocks": len(pre["cache_block_ids"]),
                    "usage_pd": pdo.get("usage"),
                    "usage_hybrid": href.get("usage"),
                }
            )
            body = greedy(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 24,
                    "return_token_ids": True,
                }
            )
            _, href = http("POST", hy.url + "/v1/chat/completions", body)
            pre, pdo = pd_request(p, d, "/v1/chat/completions", body)
            results.append(
                {
                    "kind": "chat",
                    "prompt": prompt,
                    "hybrid": href["choices"][0],
                    "pd": pdo["choices"][0],
                    "remote_session_id": pre["remote_session_id"],
                    "id": pre.get("id"),
                }
            )
        # A longer prompt: several blocks, measurable migration.
        long_prompt = " ".join(PROMPTS * 60)
        body = greedy({"model": "tiny", "prompt": long_prompt, "max_tokens": 8})
        _, href = http("POST", hy.url + "/v1/completions", body)
        pre, pdo = pd_request(p, d, "/v1/completions", body)
        results.append(
            {
                "kind": "long",
                "hybrid": href["choices"][0]["text"],
                "pd": pdo["choices"][0]["text"],
                "blocks": len(pre["cache_block_ids"]),
                "prompt_tokens": pdo.get("usage"),
            }
        )
        for r in results:
            h, q = r["hybrid"], r["pd"]
            if r["kind"] == "chat":
                r["equal"] = h.get("message", {}).get("content") == q.get("message", {}).get(
                    "content"
                ) and h.get("output_ids") == q.get("output_ids")
            else:
                r["equal"] = h == q
        report["results"] = results
        step("requests", equal=[r["equal"] for r in results])
        time.sleep(2)
        report["prefill_status"] = ext_status(p)
        report["decode_status"] = ext_status(d)
        step("status", prefill=report["prefill_status"], decode=report["decode_status"])
        # Bad migration_request straight to D must be a 400, and D must live on.
        bad = {
            "model": "tiny",
            "prompt": "x",
            "max_tokens": 2,
            "migration_request": {
                "protocol": 1,
                "remote_engine_id": "http://10.9.9.9:1",
                "remote_session_id": 1,
                "remote_token_id": 1,
                "remote_block_ids": [10**9],
            },
        }
        status, ans = http("POST", d.url + "/v1/completions", bad)
        status2, _ = http("GET", d.url + "/health")
        report["bad_migration"] = {"status": status, "answer": ans, "health_after": status2}
        step("bad migration_request", status=status, health_after=status2)
        report["ok"] = all(r["equal"] for r in results) and report["prefill_status"].get("sessions") == 0
    except Exception as e:  # noqa: BLE001 - a probe reports everything
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
        print(report["traceback"], flush=True)
    finally:
        for e in engines:
            e.stop()
        (out / "probe.json").write_text(json.dumps(report, indent=1, default=str))
    print("PROBE", "OK" if report["ok"] else "FAILED", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
