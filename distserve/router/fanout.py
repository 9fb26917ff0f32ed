"""n > 1, best_of and batches of prompts: one client request fanned out as one decode per choice.

Prompt i's choice j is a request of its own with n=1 and, when the client gave a seed, the derived seed
(seed + j) mod 2**64 (lmdeploy's own n fan-out derives it the same way): choice j equals a separate request
with that seed, token for token, whichever path serves it. Choices are indexed as OpenAI does, i * n + j.
Every choice is checked (route, context, capabilities) before any engine call; they then run concurrently
as tasks of the client's request: the first failure or a client disconnect cancels them all, and each
cancelled choice frees its prefill's KV (the orchestrator's usual exits). `usage` counts each prompt once
(OpenAI's convention) and every choice's completion tokens. best_of > n (completions, not streamed) asks
the engines for the chosen tokens' logprobs and keeps the n choices with the highest total logprob.

One prefill for n choices (`shared_prefill`): when a routable prefill reports it, each prompt is prefilled
once with `n: best_of`; the prefill samples choice j's first token with seed + j and keeps the prompt's KV
under one session per choice, and each choice is then decoded on its own (the decode strategy picks among
the prefill's linked decodes), freeing its own session on every exit the decode did not free it on.
Hybrids and lmdeploy prefills keep the n-separate fan-out.

Streams: every choice's SSE events are rewritten (their `index`), relayed into one client stream as they
come, each choice's [DONE] and usage chunk are held back, and one usage chunk (if asked) and one [DONE]
end the merged stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web

from distserve.router import capabilities
from distserve.router.errors import ApiError
from distserve.router.request import PDRequest, kv_staging
from distserve.router.upstream import UpstreamError
from distserve.router.validation import COMPLETIONS, prompt_count

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
SEED_MOD = 1 << 64


def needed(kind: str, body: dict) -> bool:
    return (body.get("n") or 1) > 1 or (kind == COMPLETIONS and (
        (body.get("best_of") or 1) > 1 or prompt_count(body) > 1 or _batched_single(body)))


def _batched_single(body: dict) -> bool:
    """A batch of one (["text"] or [[ids]]): answered like any batch (the same indexing)."""
    prompt = body.get("prompt")
    return type(prompt) is list and len(prompt) == 1 and type(prompt[0]) in (str, list)


def derived_seed(seed: int, choice: int) -> int:
    return (seed + choice) % SEED_MOD


def _prompts(kind: str, body: dict) -> list:
    prompt = body.get("prompt")
    if kind == COMPLETIONS and type(prompt) is list and prompt and type(prompt[0]) in (str, list):
        return list(prompt)
    return [prompt] if kind == COMPLETIONS else [None]


class _Merged:
    """The client's one stream, shared by every choice's sink."""

    def __init__(self, pd) -> None:
        self.pd = pd
        self.out: web.StreamResponse | None = None
        self.lock = asyncio.Lock()
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.meta: dict | None = None  # id, object, created, model of the first event

    async def prepare(self) -> None:
        if self.out is None:
            self.out = self.pd.new_stream({**SSE_HEADERS, "X-Request-Id": self.pd.rid})
            await self.out.prepare(self.pd.request)
            self.pd.outcome = "started"
            self.pd.first_at = time.perf_counter()

    async def write(self, data: bytes) -> None:
        async with self.lock:
            await self.prepare()
            await self.out.write(data)


class _Sink:
    """One choice's stream as seen by Orchestrator._stream_through: its events go into the merged stream."""

    def __init__(self, merged: _Merged, prompt: int, index: int) -> None:
        self.merged = merged
        self.prompt = prompt
        self.index = index
        self.buf = b""
        self.failed = False
        self.prepared = False

    async def prepare(self, _request) -> None:
        self.prepared = True
        await self.merged.prepare()

    async def write(self, data: bytes) -> None:
        self.buf += data
        while True:  # partition, not `b"\n\n" in`: that test makes and clears a TypeError (http1._Connection._head)
            event, sep, rest = self.buf.partition(b"\n\n")
            if not sep:
                return
            self.buf = rest
            await self._event(event)

    async def _event(self, event: bytes) -> None:
        line = event.strip()
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if type(obj) is not dict:
            return
        if "error" in obj:  # a mid-stream failure: the client sees it as it is
            self.failed = True
            await self.merged.write(b"data: " + payload + b"\n\n")
            return
        merged = self.merged
        if merged.meta is None:
            merged.meta = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        usage = obj.get("usage")
        if type(usage) is dict:
            merged.prompt_tokens[self.prompt] = usage.get("prompt_tokens") or 0
            merged.completion_tokens += usage.get("completion_tokens") or 0
        choices = obj.get("choices")
        if not choices:
            return  # a usage chunk: one merged usage chunk ends the stream
        for c in choices:
            if type(c) is dict:
                c["index"] = self.index
        obj.pop("usage", None)
        if merged.meta is not None:
            obj["id"] = merged.meta["id"]  # one id for the whole answer, as OpenAI
        await merged.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    async def write_eof(self) -> None:
        if self.buf.strip():
            await self._event(self.buf)
            self.buf = b""


async def serve(orch, pd) -> web.StreamResponse:
    kind, body = pd.kind, pd.body
    n = body.get("n") or 1
    best_of = (body.get("best_of") or n) if kind == COMPLETIONS else n
    if best_of > n and body.get("stream") is True:
        raise ApiError(400, "'best_of' cannot be used with 'stream'", "invalid_value", "best_of")
    stream = body.get("stream") is True
    want_usage = stream and (body.get("stream_options") or {}).get("include_usage") is True
    seed = body.get("seed")
    base = {k: v for k, v in body.items() if k not in ("n", "best_of")}
    if stream:
        base["stream_options"] = {"include_usage": True}  # each choice's usage, merged into one
    rank = best_of > n
    if rank and base.get("logprobs") is None:
        base["logprobs"] = 0  # the chosen tokens' logprobs rank the choices; dropped from the answer
    subs: list[tuple[int, int, PDRequest]] = []
    for i, prompt in enumerate(_prompts(kind, body)):
        for j in range(best_of):
            sub_body = dict(base)
            if kind == COMPLETIONS:
                sub_body["prompt"] = prompt
            if seed is not None:
                sub_body["seed"] = derived_seed(seed, j)
            sub = PDRequest(pd.request, kind, pd.path, f"{pd.rid}.{i}.{j}", pd.started)
            sub.new_stream = pd.new_stream
            sub.body = sub_body
            sub.raw = orjson.dumps(sub_body)
            sub.model = pd.model
            subs.append((i, j, sub))
    for _, _, sub in subs:  # every choice can be served, or the client hears why before any engine call
        await orch.precheck(sub)
    merged = _Merged(pd) if stream else None
    if merged is not None:
        for i, j, sub in subs:
            sub.sink = _Sink(merged, i, i * n + j)
    leaders = _shared_leaders(orch, pd, base, subs, best_of) if best_of > 1 else None
    if leaders is not None:  # one prefill per prompt, its KV pulled by best_of decodes
        groups = [[sub for i2, _, sub in subs if i2 == i] for i in range(len(leaders))]
        tasks = [asyncio.ensure_future(_shared_prompt(orch, leader, group))
                 for leader, group in zip(leaders, groups)]
    else:
        tasks = [asyncio.ensure_future(orch._generate(sub)) for _, _, sub in subs]
    try:
        results = await _all_or_nothing(tasks)
        if leaders is not None:
            results = [resp for group in results for resp in group]  # in subs' order: prompt, then choice
    except ApiError as exc:
        pd.engines = _via(subs, leaders)
        if merged is None or merged.out is None:
            raise
        # the stream's 200 is out: the failure goes in-band, and the stream ends without [DONE]
        pd.outcome = "upstream_error"
        await merged.write(exc.sse_event())
        await merged.out.write_eof()
        return merged.out
    except BaseException:
        pd.engines = _via(subs, leaders)
        raise
    finally:
        pd.answered = all(s.answered for _, _, s in subs)
    pd.engines = _via(subs, leaders)
    if merged is not None:
        return await _finish_stream(pd, merged, subs, want_usage)
    return _merge_unary(pd, kind, subs, results, n, rank, body.get("logprobs") is None)


def _via(subs, leaders) -> str | None:
    """The access log's "via": every choice's engines (a shared prefill's own when no choice got further)."""
    found = [s.engines for _, _, s in subs if s.engines]
    if not found and leaders:
        found = [leader.engines for leader in leaders if leader.engines]
    return ",".join(found) or None


async def _all_or_nothing(tasks: list[asyncio.Future]) -> list:
    """Every task's result; the first failure (or our cancellation) cancels the rest, then is raised."""
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _finish_stream(pd, merged: _Merged, subs, want_usage: bool) -> web.StreamResponse:
    failed = any(s.sink.failed for _, _, s in subs)
    if want_usage and not failed:
        prompt_tokens = sum(merged.prompt_tokens.values())
        meta = merged.meta or {}
        obj = {**meta, "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": merged.completion_tokens,
                         "total_tokens": prompt_tokens + merged.completion_tokens}}
        await merged.write(b"data: " + orjson.dumps(obj) + b"\n\n")
    if not failed:
        await merged.write(b"data: [DONE]\n\n")
    pd.outcome = "upstream_error" if failed else "completed"
    await merged.prepare()
    try:
        await merged.out.write_eof()
    except ConnectionResetError:
        if failed:
            raise
    return merged.out


def _merge_unary(pd, kind: str, subs, results: list, n: int, rank: bool, drop_logprobs: bool) -> web.Response:
    answers = []
    for (i, j, _), resp in zip(subs, results):
        answers.append((i, j, orjson.loads(resp.body)))
    first = answers[0][2]
    prompt_tokens: dict[int, int] = {}
    completion = 0
    choices = []
    by_prompt: dict[int, list] = {}
    for i, j, ans in answers:
        usage = ans.get("usage") or {}
        prompt_tokens.setdefault(i, usage.get("prompt_tokens") or 0)  # each prompt counted once
        completion += usage.get("completion_tokens") or 0
        by_prompt.setdefault(i, []).append((j, ans["choices"][0]))
    for i, items in sorted(by_prompt.items()):
        if rank:
            items.sort(key=lambda jc: -sum(lp for lp in ((jc[1].get("logprobs") or {}).get("token_logprobs")
                                                          or ()) if lp is not None))
            items = items[:n]
        for k, (_, choice) in enumerate(items):
            choice["index"] = i * n + k
            if rank and drop_logprobs:
                choice["logprobs"] = None
            choices.append(choice)
    p = sum(prompt_tokens.values())
    out = {"id": first.get("id"), "object": first.get("object"), "created": first.get("created"),
           "model": first.get("model"), "choices": choices,
           "usage": {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}}
    return web.Response(body=orjson.dumps(out), status=200, content_type="application/json",
                        headers={"X-Request-Id": pd.rid})


# ---------------------------------------------------------------- one prefill for n choices (shared_prefill)
def _shared_leaders(orch, pd, base: dict, subs, best_of: int) -> list | None:
    """One prefill request per prompt asking for `best_of` first tokens (`n`), when a routable prefill with
    `shared_prefill` (and a linked decode honouring the rest) serves the model; None: every choice runs as
    a request of its own (hybrids, lmdeploy prefills)."""
    model = pd.model
    needs = subs[0][2].needs | {capabilities.SHARED_PREFILL}
    entries = orch.view.table().entries.get(model) or ()
    if not any(orch._honours(e, needs, model) for e in entries):
        return None
    leaders = []
    for i in sorted({i for i, _, _ in subs}):
        first = next(sub for i2, _, sub in subs if i2 == i)
        body = dict(first.body)
        body["n"] = best_of
        if base.get("seed") is not None:
            body["seed"] = base["seed"]  # the prefill samples choice j with seed + j
        leader = PDRequest(pd.request, pd.kind, pd.path, f"{pd.rid}.{i}", pd.started)
        leader.new_stream = pd.new_stream
        leader.body = body
        leader.raw = orjson.dumps(body)
        leader.model = model
        leader.needs = needs
        leaders.append(leader)
    return leaders


async def _shared_prompt(orch, leader, choices: list) -> list:
    """One prompt's choices: one prefill (retried on another prefill like any request), then one decode per
    choice; the responses in choice order."""
    async def attempt(pd, prefill):
        return await _shared_attempt(orch, pd, choices, prefill)

    return await orch._generate(leader, attempt)


async def _shared_attempt(orch, leader, choices: list, prefill) -> list:
    answer = await orch._shielded_prefill(leader, prefill)  # n sessions: shielded as a single request's one
    sids, tokens, blocks = _shared_outputs(orch, prefill, leader, answer, len(choices))
    staging = kv_staging(answer)
    lps = answer.get("remote_logprobs")
    decode_needs = leader.needs - {capabilities.SHARED_PREFILL}
    for j, sub in enumerate(choices):
        sub.headers, sub.stream, sub.routing, sub.ctx = leader.headers, leader.stream, leader.routing, leader.ctx
        sub.needs = decode_needs
        sub.prefill, sub.session_id, sub.token_id, sub.block_ids = prefill, sids[j], tokens[j], blocks
        sub.staging = staging
        if type(lps) is list and len(lps) == len(choices) and type(lps[j]) is list:
            sub.first_logprobs = lps[j]
        sub.engines = prefill.id
    tasks = [asyncio.ensure_future(_choice_decode(orch, sub, prefill)) for sub in choices]
    return await _all_or_nothing(tasks)


def _shared_outputs(orch, prefill, leader, answer: dict, n: int) -> tuple[list[int], list[int], list]:
    sids = answer.get("remote_session_ids")
    tokens = answer.get("remote_token_ids")
    blocks = answer.get("cache_block_ids")

    def ints(v) -> bool:
        return type(v) is list and len(v) == n and all(type(x) is int for x in v)

    if ints(sids) and ints(tokens) and type(blocks) is list:
        return sids, tokens, blocks
    err = UpstreamError("answer", f"prefill answer lacks {n} remote_session_ids / remote_token_ids "
                                  "or cache_block_ids")
    orch._failed(prefill, "prefill", err)
    # whatever it preserved under the ids it gave is freed now, not at its TTL
    found = sids if type(sids) is list else [answer.get("remote_session_id")]
    for sid in found:
        if type(sid) is int:
            orch._spawn(orch._free_cache(prefill, sid, leader.headers))
    raise err.to_api_error("prefill")


def _choice_decode(orch, sub, prefill) -> Coroutine[Any, Any, web.StreamResponse]:
    """One choice's decode; its own session is freed on every exit the decode did not take it on."""
    return orch._decode_freeing(sub, prefill, orch._decode(sub, prefill))
