"""GPU check of the prefix-cache stream of stock lmdeploy engines (`GET /distserve/cache/events`).

    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu/cache_events.py --out OUT [--model DIR] [--small-pool]

Starts, through distserve's launcher with `--enable-prefix-caching`, a Hybrid engine and (with
--small-pool, lmdeploy 0.18: `--num-gpu-blocks`) a Prefill engine whose KV pool is too small to keep
everything. Checks, with the tiny random model of make_tiny_model.py:
- engine_info carries `cache_events`; the stream opens with a snapshot of this engine's incarnation;
- a chat request's prefix keys arrive as `stored` (key i = the first i messages), with token counts in
  whole blocks; a completions request's text keys too;
- a second request sharing the system prompt is served from the cache (lmdeploy's own hit counter rises)
  and its first key is one the stream already announced (what the router scores on);
- resuming with since=S gives the events after S; another incarnation gets a snapshot;
- small pool: distinct prompts evict the first ones and their keys arrive as `removed`.
Writes OUT/cache_events_<version>.json; exit 0 only if every check held.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import engine_info, ext_status, greedy, http, start_engine, wait_healthy  # noqa: E402

from distserve.cluster.prefix_keys import chat_keys, key_hex, text_keys  # noqa: E402

WORDS = ("the prefill engine reads a block of tokens from the cache and the router sends it to a decode "
         "engine near the river under the mountain where the light is open and the stone is dark ").split()


def long_text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(words))


class Stream:
    """Reads the NDJSON stream in a thread; lines are kept in order."""

    def __init__(self, url: str):
        self.lines: list[dict] = []
        self.error: str | None = None
        self.resp = urllib.request.urlopen(url, timeout=30)
        self.ctype = self.resp.headers.get("content-type")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for raw in self.resp:
                self.lines.append(json.loads(raw))
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"

    def keys(self) -> dict[str, int]:
        cached: dict[str, int] = {}
        for m in self.lines:
            if m["type"] == "snapshot":
                cached = {k: t for k, t in m["keys"]}
            elif m["type"] == "stored":
                cached.update({k: t for k, t in m["keys"]})
            elif m["type"] == "removed":
                for k in m["keys"]:
                    cached.pop(k, None)
            elif m["type"] == "cleared":
                cached = {}
        return cached

    def wait_for(self, pred, timeout: float = 15.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            time.sleep(0.1)
        return pred()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="/tmp/tiny-llama")
    ap.add_argument("--small-pool", action="store_true")
    ap.add_argument("--port", type=int, default=24333)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(a.model) / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_tiny_model.py"), a.model], check=True)
    from importlib.metadata import version

    lmd = version("lmdeploy")
    checks: list[dict] = []

    def check(name: str, ok: bool, **detail):
        checks.append({"check": name, "ok": bool(ok), **detail})
        print(("PASS " if ok else "FAIL ") + name, json.dumps(detail)[:600], flush=True)

    engines = [start_engine(a.model, "Hybrid", a.port, str(out / f"hybrid-{lmd}.log"),
                            extra=["--enable-prefix-caching"])]
    if a.small_pool:
        engines.append(start_engine(a.model, "Hybrid", a.port + 1, str(out / f"small-{lmd}.log"),
                                    extra=["--enable-prefix-caching", "--num-gpu-blocks", "64",
                                           "--session-len", "2048"]))
        # lmdeploy turns prefix caching off for PD roles: the stream must not be advertised there.
        engines.append(start_engine(a.model, "Prefill", a.port + 2, str(out / f"prefill-{lmd}.log"),
                                    extra=["--enable-prefix-caching"]))
    try:
        t0 = time.time()
        wait_healthy(engines, 300)
        hy = engines[0]
        check("engines healthy", True, seconds=round(time.time() - t0, 1), lmdeploy=lmd)
        info = engine_info(hy)
        ce = info.get("cache_events")
        check("engine_info carries cache_events", isinstance(ce, dict) and ce.get("path") == "/distserve/cache/events",
              cache_events=ce, instance_id=info.get("instance_id"))
        bs = ce["block_size"]
        s = Stream(hy.url + "/distserve/cache/events")
        s.wait_for(lambda: s.lines)
        first = s.lines[0] if s.lines else {}
        check("stream opens with a snapshot of this incarnation",
              first.get("type") == "snapshot" and first.get("incarnation") == info.get("instance_id")
              and s.ctype == "application/x-ndjson", first=first, content_type=s.ctype)

        system = long_text(1, 400)
        m1 = [{"role": "system", "content": system}, {"role": "user", "content": "which engine reads the block?"}]
        st, ans = http("POST", hy.url + "/v1/chat/completions",
                       greedy({"model": "tiny", "messages": m1, "max_tokens": 8, "return_token_ids": True}))
        k1 = [key_hex(k) for k in chat_keys(m1)]
        got = s.wait_for(lambda: k1[0] in s.keys() and k1[1] in s.keys())
        cached = s.keys()
        check("chat request: its prefix keys stored", st == 200 and got,
              status=st, keys={k: cached.get(k) for k in k1},
              prompt_tokens=(ans.get("usage") or {}).get("prompt_tokens") if isinstance(ans, dict) else None)
        check("key tokens are whole blocks, longer prefix covers more",
              got and cached[k1[0]] % bs == 0 and 0 < cached[k1[0]] <= cached[k1[1]], block_size=bs)

        before = ext_status(hy).get("cache_events", {})
        m2 = [{"role": "system", "content": system}, {"role": "user", "content": "where is the river and the stone?"}]
        k2 = [key_hex(k) for k in chat_keys(m2)]
        announced = k2[0] in s.keys()  # what a router would score, before sending
        st2, _ = http("POST", hy.url + "/v1/chat/completions", greedy({"model": "tiny", "messages": m2, "max_tokens": 8}))
        time.sleep(0.6)
        after = ext_status(hy).get("cache_events", {})
        hit = (after.get("hit_tokens") or 0) - (before.get("hit_tokens") or 0)
        check("second request sharing the system prompt: announced before, served from cache",
              st2 == 200 and announced and hit >= cached.get(k1[0], 1),
              announced=announced, hit_tokens=hit, key0_tokens=cached.get(k1[0]), status_after=after)
        s.wait_for(lambda: k2[1] in s.keys())

        prompt = long_text(2, 300)
        st3, _ = http("POST", hy.url + "/v1/completions", greedy({"model": "tiny", "prompt": prompt, "max_tokens": 4}))
        tk = [key_hex(k) for k in text_keys(prompt)]
        got = s.wait_for(lambda: tk[-1] in s.keys())
        ck = s.keys()
        check("completions request: text keys stored", st3 == 200 and got,
              n_text_keys=len(tk), stored=sum(k in ck for k in tk), longest_tokens=ck.get(tk[-1]))

        seqs = [m["seq"] for m in s.lines if m["type"] != "heartbeat"]
        check("event seqs increase by one", seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs=seqs[:40])
        inc = info["instance_id"]
        mid = seqs[len(seqs) // 2]
        r = Stream(hy.url + f"/distserve/cache/events?incarnation={inc}&since={mid}")
        r.wait_for(lambda: len(r.lines) >= len([q for q in seqs if q > mid]))
        resumed = [m["seq"] for m in r.lines if m["type"] != "heartbeat"]
        check("resume since=S gives the events after S", resumed == [q for q in seqs if q > mid], resumed=resumed)
        o = Stream(hy.url + f"/distserve/cache/events?incarnation=other&since={mid}")
        o.wait_for(lambda: o.lines)
        check("another incarnation gets a snapshot with every key",
              o.lines and o.lines[0]["type"] == "snapshot" and {k for k, _ in o.lines[0]["keys"]} == set(s.keys()),
              n_keys=len(o.lines[0]["keys"]) if o.lines else None)
        time.sleep(2.5)
        check("heartbeat while idle", any(m["type"] == "heartbeat" for m in s.lines), stream_error=s.error)
        st, bad = http("GET", hy.url + "/distserve/cache/events?since=-3")
        check("bad since answered 400", st == 400, answer=bad)

        if a.small_pool:
            pinfo = engine_info(engines[2])
            st, ans = http("GET", engines[2].url + "/distserve/cache/events")
            check("Prefill role: no cache_events advertised, stream 404 (lmdeploy disables PD prefix caching)",
                  "cache_events" not in pinfo and st == 404, status=st, answer=ans)
            pf = engines[1]
            p = Stream(pf.url + "/distserve/cache/events")
            first_keys = None
            for i in range(12):  # several blocks of 64 tokens each: 64 blocks cannot keep them all
                msgs = [{"role": "system", "content": long_text(10 + i, 400)}, {"role": "user", "content": "go"}]
                st, _ = http("POST", pf.url + "/v1/chat/completions",
                             greedy({"model": "tiny", "messages": msgs, "max_tokens": 2}))
                if i == 0:
                    first_keys = [key_hex(k) for k in chat_keys(msgs)]
                    p.wait_for(lambda: first_keys[0] in p.keys())  # noqa: B023 - called at once
            p.wait_for(lambda: any(m["type"] == "removed" for m in p.lines))
            removed = [k for m in p.lines if m["type"] == "removed" for k in m["keys"]]
            pst = ext_status(pf)
            check("small pool: eviction sends removed keys, the first prompt's among them",
                  removed and first_keys[0] in removed and first_keys[0] not in p.keys(),
                  n_removed=len(removed), keys_now=len(p.keys()), status=pst.get("cache_events"),
                  free_gpu_blocks=pst.get("free_gpu_blocks"), num_gpu_blocks=pst.get("num_gpu_blocks"))
        check("hybrid ext/status", True, status=ext_status(hy))
    except Exception as e:  # noqa: BLE001
        check("no exception", False, error=f"{type(e).__name__}: {e}")
    finally:
        for e in engines:
            e.stop()
    ok = all(c["ok"] for c in checks)
    (out / f"cache_events_{lmd}.json").write_text(json.dumps({"lmdeploy": lmd, "ok": ok, "checks": checks}, indent=1))
    print("ALL PASS" if ok else "SOME FAILED", lmd)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
