"""The real engine: the torch model, its paged KV pool and a continuous-batching scheduler thread.

The scheduler runs in one worker thread (torch releases the GIL in its kernels, so the event loop stays
responsive). Each loop either prefills newly admitted sequences or decodes every running sequence in
one batch. Admission needs the prompt's blocks; a running sequence that needs a new block when none is
free preempts the newest running sequence (its KV is recomputed later): requests wait, nothing crashes.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from distserve.engine import tokenizer
from distserve.engine.config import ModelConfig
from distserve.engine.core import Engine, Executor, Resume, Step, blocks_for
from distserve.engine.model import Model, load_weights
from distserve.engine.openai_api import ApiError, SamplingRequest
from distserve.migration.staging import is_one_run

log = logging.getLogger("distserve.engine.torch")

_GOLDEN = 0x9E3779B97F4A7C15
# Below these, sampling is greedy (see _sample).
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-8


@dataclass(eq=False)
class Sequence:
    sid: int
    req: SamplingRequest
    tokens: list[int]
    num_prompt: int
    generated: int
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pool
    seed: int = 0
    done: bool = False
    session_id: int | None = None  # a preserved prefill session made for this sequence
    session_ids: list[int] | None = None  # a shared prefill's sessions, one per choice
    # A shared prefill (req.n > 1): each choice's first token and logprobs entry, sampled with seed + i.
    choices: list[tuple[int, list | None]] | None = None
    start: int = 0  # tokens of the prefill served from the prefix cache (its first blocks are cached ones)

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class TorchExecutor(Executor):
    kind = "reference"

    def __init__(self, cfg: ModelConfig, threads: int | None = 1, max_batch_size: int = 64,
                 max_prefill_tokens: int = 4096, tok=None) -> None:
        self.cfg = cfg
        # None: torch's default (one thread per physical core), as transformers runs.
        self.threads = max(1, threads) if threads is not None else torch.get_num_threads()
        self.max_batch_size = max(1, max_batch_size)
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.tokenizer = tok if tok is not None else tokenizer.BYTE_TOKENIZER
        self.eos_ids = frozenset(self.tokenizer.eos_ids) | frozenset(cfg.eos_token_ids)
        torch.set_num_threads(self.threads)
        self.model = Model(cfg, load_weights(cfg))
        self.pool = self.model.new_pool()
        self.pool_ptr = self.pool.data_ptr()
        self.engine: Engine | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._last_was_prefill = False
        self._early: tuple | None = None
        self.running = self.waiting = self.prefill_tokens_pending = 0
        self.preemptions_total = 0
        self.decode_steps_total = 0
        self.prefill_seconds_total = 0.0  # wall time of prefill forward passes (tools/bench_n.py)
        self.prefill_tokens_total = 0  # prompt tokens those passes computed (prefix-cache hits excluded)
        self.decode_tokens_total = 0

    async def start(self, engine: Engine) -> None:
        self.engine = engine
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._inbox.put(("stop", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # -- the asyncio side --------------------------------------------------------------------------
    async def run(self, req: SamplingRequest, resume: Resume | None) -> AsyncIterator[Step]:
        engine = self.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little")
        seq = Sequence(next(self._ids), req, list(req.prompt_ids), len(req.prompt_ids), 0, asyncio.Queue(), loop,
                       seed=seed % (1 << 64))
        added = finished = False
        try:
            if resume is not None:
                # P sampled the first token; our blocks already hold the prompt's KV.
                seq.tokens.append(resume.first_token)
                seq.generated = 1
                seq.blocks = resume.blocks
                seq.num_computed = seq.num_prompt
                finish = self._finish_reason(seq, resume.first_token)
                # the prefill computed the first token's logprobs (remote_logprobs): emitted as it sent them
                first_lp = [req.first_logprobs] if req.logprobs is not None and req.first_logprobs else None
                if finish:
                    finished = True
                    engine.allocator.free(seq.blocks)
                    yield Step([resume.first_token], finish, logprobs=first_lp)
                    return
                yield Step([resume.first_token], logprobs=first_lp)
            self._inbox.put(("add", seq))
            added = True
            while True:
                item = await seq.out.get()
                if isinstance(item, ApiError):
                    finished = True
                    raise item
                if item.finish:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                if added:
                    self._inbox.put(("abort", seq))
                else:  # closed before the scheduler saw it (e.g. a stop string in the first token)
                    seq.done = True
                    engine.allocator.free(seq.blocks)

    # -- the scheduler thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            idle = not self._running and not self._waiting
            msgs = [self._early] if self._early is not None else []
            self._early = None
            try:
                if idle and not msgs:
                    msgs.append(self._inbox.get(timeout=1.0))
            except queue.Empty:
                pass
            while True:
                try:
                    msgs.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, seq in msgs:
                if kind == "stop":
                    self._fail_all(ApiError(503, "engine is shutting down", "unavailable"))
                    return
                if kind == "add" and not seq.done:
                    (self._running if seq.num_computed else self._waiting).append(seq)
                elif kind == "abort":
                    self._drop(seq)
            try:
                progressed = self._step()
            except Exception:  # noqa: BLE001 - one bad step must not kill the engine
                log.exception("engine step failed")
                self._fail_all(ApiError(500, "internal engine error during a model step", "internal_error"))
                progressed = True
            self._publish()
            if not progressed:
                # Waiting for blocks (freed by other threads, e.g. free_cache): poll, do not spin.
                try:
                    self._early = self._inbox.get(timeout=0.01)
                except queue.Empty:
                    pass

    def _publish(self) -> None:
        self.running = len(self._running)
        self.waiting = len(self._waiting)
        self.prefill_tokens_pending = sum(self._ctx_len(s) for s in self._waiting)

    def _drop(self, seq: Sequence) -> None:
        if seq.done:
            # Aborted after it finished but before its caller took the result (e.g. the client went
            # away): nobody will migrate a preserved prefill, so free it now rather than at its TTL.
            if seq.session_id is not None and self.engine is not None:
                for sid in seq.session_ids or [seq.session_id]:
                    self.engine.sessions.free(sid)
                seq.session_id = seq.session_ids = None
            return
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        assert self.engine is not None
        if seq.blocks:
            self.engine.allocator.free(seq.blocks)
            seq.blocks = []

    def _fail(self, seq: Sequence, error: ApiError) -> None:
        """Fail one sequence: out of the queues, blocks freed, the error to its caller."""
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if not seq.done:
            seq.done = True
            self._free(seq)
            seq.emit(error)

    def _fail_all(self, error: ApiError) -> None:
        for seq in [*self._running, *self._waiting]:
            seq.done = True
            self._free(seq)
            seq.emit(error)
        self._running.clear()
        self._waiting.clear()

    @staticmethod
    def _ctx_len(seq: Sequence) -> int:
        """Tokens to prefill: the prompt (fresh) or everything but the last token (recompute)."""
        return len(seq.tokens) - (1 if seq.generated else 0)

    def _step(self) -> bool:
        """One prefill or one decode batch; False when nothing could run (waiting for blocks)."""
        assert self.engine is not None
        allocator, bs = self.engine.allocator, self.cfg.block_size
        if self._waiting and (not self._last_was_prefill or not self._running):
            batch, budget = [], self.max_prefill_tokens
            while self._waiting and len(self._running) + len(batch) < self.max_batch_size:
                seq = self._waiting[0]
                n = self._ctx_len(seq)
                if batch and n > budget:
                    break
                # The longest cached prefix is reused; only the rest is computed (and allocated).
                cached = self.engine.cache_acquire(seq.tokens[:n], count_prompt=False)
                blocks = allocator.allocate(blocks_for(n, bs) - len(cached))
                if blocks is None:
                    allocator.free(cached)
                    break  # back-pressure: wait for blocks to be freed
                if not seq.generated:  # a fresh prompt (a recompute is not a prompt)
                    self.engine.prompt_tokens_total += n
                    self.engine.prefix_cache_hit_tokens_total += len(cached) * bs
                seq.blocks = cached + blocks
                seq.start = len(cached) * bs
                self._waiting.popleft()
                batch.append(seq)
                budget -= n
            if batch:
                self._last_was_prefill = True
                self._prefill(batch)
                return True
        self._last_was_prefill = False
        if not self._running:
            return False
        for seq in list(self._running):
            if seq.done or seq not in self._running:
                continue
            while seq.num_computed // bs >= len(seq.blocks):
                got = allocator.allocate(1)
                if got is not None:
                    seq.blocks.extend(got)
                    continue
                victim = self._running[-1]
                if victim is seq and len(self._running) == 1:
                    # Alone and still no block: the pool is held by preserved sessions; stop here.
                    self._finish(seq, None, "length")
                    break
                self._preempt(victim)
                if victim is seq:
                    break
        if self._running:
            self._decode(list(self._running))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions_total += 1
        self._running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        self._waiting.appendleft(seq)

    def _prefill(self, batch: list[Sequence]) -> None:
        t0 = time.perf_counter()
        try:
            logits = self.model.prefill(self.pool, [(s.tokens[s.start: self._ctx_len(s)], s.blocks, s.start)
                                                    for s in batch])
            self.prefill_seconds_total += time.perf_counter() - t0
            self.prefill_tokens_total += sum(self._ctx_len(s) - s.start for s in batch)
        except Exception:  # noqa: BLE001 - the batch is in neither queue yet: fail it here or its blocks leak
            log.exception("prefill step failed")
            for seq in batch:
                self._fail(seq, ApiError(500, "internal engine error during prefill", "internal_error"))
            return
        for i, seq in enumerate(batch):
            seq.num_computed = self._ctx_len(seq)
            self.engine.cache_register(seq.tokens[: seq.num_computed], seq.blocks)
            if seq.done:
                self._free(seq)
                continue
            if seq.generated:  # a recomputed sequence resumes decoding
                self._running.append(seq)
                continue
            self._running.append(seq)
            self._sample_and_accept(seq, logits[i])

    def _decode(self, batch: list[Sequence]) -> None:
        logits = self.model.decode(self.pool, [(s.tokens[-1], s.num_computed, s.blocks) for s in batch])
        self.decode_steps_total += 1
        self.decode_tokens_total += len(batch)
        for i, seq in enumerate(batch):
            seq.num_computed += 1
            self._sample_and_accept(seq, logits[i])

    def _sample_and_accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        # A sampling failure concerns this request only; the rest of the batch goes on.
        try:
            raw = logits
            logits = self._adjust(seq, logits)
            token = self._sample(seq, logits, seq.seed)
            entry = self._logprob_entry(seq, raw, token)
            if seq.req.n > 1 and not seq.generated:
                # a shared prefill: choice i is what a separate request seeded with seed + i samples here
                seq.choices = [(token, entry)]
                for i in range(1, seq.req.n):
                    t = self._sample(seq, logits, (seq.seed + i) % (1 << 64))
                    seq.choices.append((t, self._logprob_entry(seq, raw, t)))
        except Exception:  # noqa: BLE001
            log.exception("sampling failed for request %d", seq.sid)
            self._fail(seq, ApiError(500, "internal engine error while sampling", "internal_error"))
            return
        self._accept(seq, token, entry)

    @staticmethod
    def _logprob_entry(seq: Sequence, logits: torch.Tensor, token: int) -> list | None:
        """[logprob of token, [[id, logprob], ...the k most likely]] from the raw logits (before any knob or
        temperature, as OpenAI reports them), or None when the request did not ask."""
        k = seq.req.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(lp, k) if k else None
        pairs = [[int(i), float(v)] for v, i in zip(top.values, top.indices)] if top is not None else []
        return [float(lp[token]), pairs]

    @staticmethod
    def _adjust(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias and the penalties (presence/frequency over generated tokens, repetition over prompt and
        generated, as vLLM and lmdeploy apply them); the logits unchanged when none is set."""
        req = seq.req
        if not (req.logit_bias or req.repetition_penalty or req.presence_penalty or req.frequency_penalty):
            return logits
        out = logits.double().clone()
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long)
            out[ids] += torch.tensor(list(req.logit_bias.values()), dtype=torch.float64)
        if req.repetition_penalty:
            ids = torch.tensor(sorted(set(seq.tokens)), dtype=torch.long)
            vals = out[ids]
            out[ids] = torch.where(vals > 0, vals / req.repetition_penalty, vals * req.repetition_penalty)
        generated = seq.tokens[seq.num_prompt:]
        if generated and (req.presence_penalty or req.frequency_penalty):
            counts = collections.Counter(generated)
            ids = torch.tensor(list(counts), dtype=torch.long)
            c = torch.tensor(list(counts.values()), dtype=torch.float64)
            out[ids] -= (req.frequency_penalty or 0.0) * c + (req.presence_penalty or 0.0)
        return out

    def _sample(self, seq: Sequence, logits: torch.Tensor, seed: int) -> int:
        req = seq.req
        # Tiny temperatures overflow logits/temperature to inf (softmax NaN); tiny top_p keeps one
        # token anyway. Both are greedy in effect, so sample them greedily.
        if req.temperature < MIN_TEMPERATURE or req.top_p < MIN_TOP_P:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / req.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            return int(torch.argmax(logits))
        if req.top_k and req.top_k < probs.numel():
            cut = torch.topk(probs, req.top_k).values[-1]
            probs = torch.where(probs >= cut, probs, torch.zeros_like(probs))
        if req.min_p:
            probs = torch.where(probs >= req.min_p * probs.max(), probs, torch.zeros_like(probs))
        if req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < req.top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        # One generator per position: a seeded request samples the same tokens in PD as in hybrid.
        gen = torch.Generator().manual_seed((seed + seq.generated * _GOLDEN) % (1 << 64))
        return int(torch.multinomial(probs, 1, generator=gen))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.eos_ids and not seq.req.ignore_eos:
            return "stop"
        if seq.generated >= seq.req.max_tokens:
            return "length"
        if len(seq.tokens) >= self.cfg.max_model_len:
            return "length"
        return None

    def _accept(self, seq: Sequence, token: int, entry: list | None = None) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        finish = self._finish_reason(seq, token)
        if finish:
            self._finish(seq, token, finish, entry)
        else:
            seq.emit(Step([token], logprobs=[entry] if entry is not None else None))

    def _pack(self, blocks: list[int]):
        """The staging slot holding a copy of scattered blocks, or None (one run already, no arena, arena
        full, or the copy failed: packing is an optimisation, the decode then reads the blocks)."""
        arena = self.engine.staging if self.engine is not None else None
        if arena is None or is_one_run(blocks):
            return None
        try:
            return arena.pack(blocks)
        except Exception:  # noqa: BLE001 - never fail a finished prefill over its packed copy
            log.exception("packing %d blocks into the staging arena failed; the decode reads them directly",
                          len(blocks))
            return None

    def _finish(self, seq: Sequence, token: int | None, finish: str, entry: list | None = None) -> None:
        assert self.engine is not None
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        tokens = [token] if token is not None else []
        lps = [entry] if entry is not None and token is not None else None
        # The generated tokens' full blocks too: the next turn of a conversation starts with them.
        self.engine.cache_register(seq.tokens[: seq.num_computed], seq.blocks)
        prompt_blocks = blocks_for(seq.num_prompt, self.cfg.block_size)
        if seq.req.preserve_cache and len(seq.blocks) >= prompt_blocks:
            kept, rest = seq.blocks[:prompt_blocks], seq.blocks[prompt_blocks:]
            self.engine.allocator.free(rest)
            sessions = self.engine.sessions
            sid = sessions.new_session_id()
            # Scattered blocks are packed into one slot here, in the thread that wrote them, so a decode
            # reads one range instead of one per run and layer (distserve.migration.staging).
            slot = self._pack(kept)
            choices = None
            if seq.choices is not None:
                # one session id per choice over the same blocks: each decode frees its own (idempotent),
                # the blocks go when the last is freed (distserve.migration.blocks.PreservedSessions)
                sids = [sid] + [sessions.new_session_id() for _ in seq.choices[1:]]
                sessions.add_shared(sids, kept, slot)
                seq.session_ids = sids
                choices = [(t, e, s) for (t, e), s in zip(seq.choices, sids)]
            else:
                sessions.add(sid, kept, slot)
            seq.session_id = sid
            seq.blocks = []
            seq.emit(Step(tokens, finish, cache_block_ids=list(kept), session_id=sid,
                          kv_staging=(slot.offset, slot.length) if slot is not None else None, logprobs=lps,
                          choices=choices))
            return
        ids = list(seq.blocks[:prompt_blocks])
        self._free(seq)
        seq.emit(Step(tokens, finish, cache_block_ids=ids, logprobs=lps))
