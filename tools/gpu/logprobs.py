"""GPU check: logprobs of stock lmdeploy engines, Hybrid against PD by hand (issue 19).

    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu/logprobs.py --out OUT [--model DIR]

Starts through distserve's launcher, on one GPU, a Hybrid, a Prefill and a Decode engine with
`--logprobs-mode raw_logprobs` (lmdeploy answers 400 to logprobs without it) and a Hybrid without it, does
lmdeploy's handshake (protocol TCP: distserve's staged-TCP backend) and sends, greedy with ignore_eos:
- chat `logprobs: true, top_logprobs: 2` (with `return_token_ids`) to the Hybrid, stream and not;
- the same through PD as distserve's router does it: a prefill call with max_tokens 1, with_cache and
  preserve_cache (not streamed), then the decode with `migration_request`, stream and not;
- completions `logprobs: 2`, Hybrid and PD, stream and not;
- chat and completions logprobs to the Hybrid without `--logprobs-mode`.
Records every answer as the engine sent it (streams as their raw `data:` lines) and a summary: per token,
the Hybrid's logprobs against the prefill's and the decode's. Writes OUT/logprobs_<version>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import greedy, handshake, http, start_engine, wait_healthy  # noqa: E402

MESSAGES = [{"role": "user", "content": "the prefill engine reads a block of tokens"}]
PROMPT = "river mountain cloud stone light dark"
MAX_TOKENS = 6


def raw_post(url: str, body: dict, timeout: float = 120.0) -> dict:
    """POST and keep the answer as sent: status, body text (a stream cut short keeps what came)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status = r.status
            try:
                raw, cut = r.read(), None
            except http.client.IncompleteRead as e:
                raw, cut = e.partial, f"IncompleteRead: {e!r}"[:300]
    except urllib.error.HTTPError as e:
        status, raw, cut = e.code, e.read(), None
    except Exception as e:  # noqa: BLE001 - a broken stream is a finding, not a crash
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    text = raw.decode(errors="replace")
    out: dict = {"status": status}
    if cut:
        out["cut"] = cut
    if body.get("stream"):
        events = []
        for line in text.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                try:
                    events.append(json.loads(data))
                except ValueError:
                    events.append(data)
        out["events"] = events
    else:
        try:
            out["body"] = json.loads(text)
        except ValueError:
            out["body"] = text
    return out


def chat_content(ans: dict) -> list | None:
    """chat logprobs.content[] of an answer (stream: concatenated over events)."""
    if "body" in ans:
        try:
            lp = ans["body"]["choices"][0].get("logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return None if lp is None else lp.get("content")
    items = []
    for ev in ans.get("events") or []:
        if isinstance(ev, dict) and ev.get("choices"):
            lp = ev["choices"][0].get("logprobs")
            items.append(None if lp is None else lp.get("content"))
    return items


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/distserve-tiny")
    ap.add_argument("--port", type=int, default=25333)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    lmd = version("lmdeploy")
    report: dict = {"lmdeploy": lmd, "model": "tools/gpu/make_tiny_model.py (tiny random Llama)", "cases": {}}
    path = out / f"logprobs_{lmd}.json"

    def save():
        path.write_text(json.dumps(report, indent=1))

    if not (Path(a.model) / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_tiny_model.py"), a.model], check=True)
    lp = ["--logprobs-mode", "raw_logprobs"]
    hy = start_engine(a.model, "Hybrid", a.port, str(out / "hybrid.log"), extra=lp)
    p = start_engine(a.model, "Prefill", a.port + 1, str(out / "prefill.log"), extra=lp)
    d = start_engine(a.model, "Decode", a.port + 2, str(out / "decode.log"), extra=lp)
    plain = start_engine(a.model, "Hybrid", a.port + 3, str(out / "plain.log"))
    engines = [hy, p, d, plain]
    cases = report["cases"]
    try:
        t0 = time.time()
        wait_healthy(engines, 240)
        report["healthy_s"] = round(time.time() - t0, 1)
        hs = handshake(p, d, protocol=1)
        report["handshake_s"] = round(hs["handshake_s"], 3)
        print("engines up", report["healthy_s"], flush=True)

        def pd(kind: str, body: dict, stream: bool) -> None:
            route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            pre = {**body, "max_tokens": 1, "stream": False, "with_cache": True, "preserve_cache": True}
            if kind == "chat":
                pre["max_completion_tokens"] = 1
            pa = raw_post(p.url + route, pre)
            name = f"pd_{kind}_{'stream' if stream else 'unary'}"
            cases[name + "_prefill"] = pa
            b = pa.get("body") if isinstance(pa.get("body"), dict) else {}
            if pa.get("status") != 200 or "remote_session_id" not in b:
                cases[name + "_decode"] = {"skipped": "prefill failed"}
                return
            mig = {
                "protocol": 1,
                "remote_engine_id": p.url,
                "remote_session_id": b["remote_session_id"],
                "remote_token_id": b["remote_token_ids"][-1],
                "remote_block_ids": b["cache_block_ids"],
                "is_dummy_prefill": False,
            }
            cases[name + "_decode"] = raw_post(d.url + route, {**body, "stream": stream, "migration_request": mig})

        chat = greedy({"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 2, "return_token_ids": True})
        comp = greedy({"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "logprobs": 2})
        for stream in (False, True):
            s = "stream" if stream else "unary"
            cases[f"hybrid_chat_{s}"] = raw_post(hy.url + "/v1/chat/completions", {**chat, "stream": stream})
            pd("chat", chat, stream)
            cases[f"hybrid_completions_{s}"] = raw_post(hy.url + "/v1/completions", {**comp, "stream": stream})
            pd("completions", comp, stream)
            save()
        cases["plain_chat_logprobs"] = raw_post(plain.url + "/v1/chat/completions", chat)
        cases["plain_completions_logprobs"] = raw_post(plain.url + "/v1/completions", comp)
        # the decode must still serve after all that
        st, _ = http("GET", d.url + "/health")
        report["decode_healthy_after"] = st == 200

        # summary: per token, what each path gave
        summary = {
            "hybrid_unary": chat_content(cases["hybrid_chat_unary"]),
            "prefill_unary": chat_content(cases["pd_chat_unary_prefill"]),
            "decode_unary": chat_content(cases.get("pd_chat_unary_decode", {})),
            "hybrid_stream": chat_content(cases["hybrid_chat_stream"]),
            "decode_stream": chat_content(cases.get("pd_chat_stream_decode", {})),
        }
        for k in ("hybrid_chat_unary", "pd_chat_unary_decode"):
            try:
                summary[k + "_token_ids"] = cases[k]["body"]["choices"][0].get("token_ids") or \
                    cases[k]["body"].get("token_ids")
            except (KeyError, IndexError, TypeError):
                pass
        report["chat_summary"] = summary
        report["ok"] = True
    except Exception:  # noqa: BLE001
        report["error"] = traceback.format_exc()
        print(report["error"], flush=True)
    finally:
        for e in engines:
            e.stop()
        save()
    print(json.dumps(report.get("chat_summary"), indent=1)[:6000], flush=True)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
