"""The engine core shared by the null mode and the torch model: roles, PD logic, KV bookkeeping.

An `Executor` turns sequences into tokens (NullExecutor here, TorchExecutor in torch_backend). The
`Engine` owns the block allocator, the preserved prefill sessions, the migration manager, and the
decode side of a migration (validate -> allocate -> pull -> free the prefill's blocks -> decode on).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

import aiohttp

from distserve import tracing
from distserve.engine import tokenizer
from distserve.engine.prefix_cache import CacheEvents
from distserve.migration.blocks import BlockAllocator, PreservedSessions, block_hashes
from distserve.engine.config import ModelConfig
from distserve.engine.openai_api import ApiError, SamplingRequest
from distserve.migration.errors import MigrationError
from distserve.migration.geometry import PoolGeometry
from distserve.migration.manager import MigrationManager
from distserve.migration.staging import StagingArena
from distserve.protocol import (
    CachePool,
    CacheFreeRequest,
    DistServeEngineConfig,
    EngineRole,
    MigrationProtocol,
    kv_layout_fingerprint,
)

log = logging.getLogger("distserve.engine")


@dataclass
class Step:
    """New tokens of one request; the last step has `finish` set."""

    token_ids: list[int]
    finish: str | None = None  # "stop" | "length"
    cache_block_ids: list[int] | None = None
    session_id: int | None = None
    kv_staging: tuple[int, int] | None = None  # (offset, length) of the packed copy in the staging arena
    # Per token of token_ids when the request asked for logprobs: [logprob, [[id, logprob], ...top k]].
    logprobs: list | None = None
    # A shared prefill (n > 1): every choice's first token, its logprobs entry (or None) and session id.
    choices: list[tuple[int, list | None, int | None]] | None = None


@dataclass
class Resume:
    """A decode that continues from migrated KV: `blocks` hold the prompt, `first_token` was sampled by P."""

    blocks: list[int]
    first_token: int


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Executor(ABC):
    """Runs sequences. `run` yields Steps; closing the iterator aborts the sequence and frees its blocks."""

    kind: str = "reference"

    @abstractmethod
    async def start(self, engine: "Engine") -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def run(self, req: SamplingRequest, resume: Resume | None) -> AsyncIterator[Step]: ...

    pool_ptr: int | None = None
    running: int = 0
    waiting: int = 0
    prefill_tokens_pending: int = 0


@dataclass
class EngineSettings:
    role: EngineRole = EngineRole.Hybrid
    model_name: str = "distserve-reference"
    protocol: MigrationProtocol = MigrationProtocol.TCP
    transfer_host: str = "127.0.0.1"
    preserve_ttl: float = 60.0
    migration_deadline: float = 30.0
    migration_inflight_calls: int = 2
    # Block units of the staging arena (distserve.migration.staging); 0 = no staging (direct reads only).
    staging_blocks: int | None = None  # None: a quarter of the pool
    scattered_allocation: bool = False  # random block ids: a worst-case fragmented pool (tests, benchmarks)
    peer_token: str | None = None  # Bearer key for calls to other engines (free_cache)
    null: bool = False
    prefix_caching: bool = True  # automatic prefix caching (`--prefix-caching on|off`)
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])


class Engine:
    def __init__(self, model: ModelConfig, settings: EngineSettings, executor: Executor) -> None:
        self.model = model
        self.settings = settings
        self.executor = executor
        # The model's tokenizer (a checkpoint's own, from the executor), else the built-in byte tokenizer.
        self.tokenizer = getattr(executor, "tokenizer", None) or tokenizer.BYTE_TOKENIZER
        self.allocator = BlockAllocator(model.num_blocks, scattered=settings.scattered_allocation,
                                        prefix_caching=settings.prefix_caching)
        self.cache_events = CacheEvents(self.allocator, settings.instance_id, model.block_size)
        self.prompt_tokens_total = 0
        self.prefix_cache_hit_tokens_total = 0
        self.migration_blocks_reused_total = 0
        self.sessions = PreservedSessions(self.allocator, settings.preserve_ttl)
        self.started_at = time.time()
        self.requests_total = 0
        self.request_errors_total = 0
        self.free_cache_calls_total = 0
        self.remote_frees_failed_total = 0
        self.migration: MigrationManager | None = None
        self.staging = None  # StagingArena, for engines with a real KV pool
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._http = None
        self._tracing = False  # this engine started tracing (init matched by shutdown in stop())
        self.healthy = False

    # -- geometry ----------------------------------------------------------------------------------
    def cache_pool(self) -> CachePool:
        return CachePool(shape=self.model.kv_block_shape, dtype="null" if self.settings.null else self.model.dtype,
                         element_size=self.model.element_size, entry_axis=1)

    def engine_config(self) -> DistServeEngineConfig:
        return DistServeEngineConfig(tp_size=1, ep_size=1, dp_size=1, pp_size=1, dp_rank=0,
                                     block_size=self.model.block_size, num_cpu_blocks=0,
                                     num_gpu_blocks=self.model.num_blocks)

    def engine_info(self) -> dict:
        info = self.engine_config().model_dump(mode="json")
        info.update(kv_layout=kv_layout_fingerprint([self.cache_pool()]),
                    engine_kind="null" if self.settings.null else "reference",
                    instance_id=self.settings.instance_id,
                    role=self.settings.role.name.lower(),
                    migration_protocol=self.settings.protocol.name.lower(),
                    model=self.settings.model_name,
                    max_model_len=self.model.max_model_len,  # agents publish these: routers check contexts
                    max_token_bytes=getattr(self.tokenizer, "max_token_bytes", None))
        if self.settings.prefix_caching:  # agents publish it: routers stream our cache state from there
            info["cache_events"] = self.cache_events.info()
        return info

    # -- prefix cache ------------------------------------------------------------------------------
    def cache_acquire(self, tokens: list[int], count_prompt: bool = True) -> list[int]:
        """The blocks of the longest cached prefix of `tokens` (a reference taken on each: give them back
        with allocator.free), at most (len - 1) // block_size blocks: the last token is always computed
        (its logits sample the next token). Counts prompt and hit tokens when `count_prompt`."""
        bs = self.model.block_size
        blocks: list[int] = []
        if self.settings.prefix_caching and len(tokens) > bs:
            blocks = self.allocator.acquire_cached(block_hashes(tokens, bs, (len(tokens) - 1) // bs))
        if count_prompt:
            self.prompt_tokens_total += len(tokens)
            self.prefix_cache_hit_tokens_total += len(blocks) * bs
        return blocks

    def cache_register(self, tokens: list[int], blocks: list[int]) -> None:
        """Cache the full blocks of `tokens` (their KV computed in `blocks`)."""
        if self.settings.prefix_caching:
            bs = self.model.block_size
            self.allocator.register(blocks, block_hashes(tokens, bs, min(len(blocks), len(tokens) // bs)))

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tracing = True
        tracing.init("distserve-engine", {"service.instance.id": self.settings.instance_id,
                                          "distserve.engine.role": self.settings.role.name.lower()})
        await self.executor.start(self)
        self.staging = self._make_staging()
        self.sessions.arena = self.staging
        self.migration = MigrationManager(
            PoolGeometry.from_cache_pool(self.cache_pool()), self.engine_config(), self.settings.protocol,
            self.settings.transfer_host, pool_ptr=self.executor.pool_ptr, null=self.settings.null,
            deadline_s=self.settings.migration_deadline,
            max_inflight_calls=self.settings.migration_inflight_calls, staging=self.staging)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_sessions())
        self.healthy = True

    def _make_staging(self):
        pool = getattr(self.executor, "pool", None)
        units = self.settings.staging_blocks
        if units is None:
            units = max(16, self.model.num_blocks // 4)
        if self.settings.null or pool is None or units <= 0:
            return None
        return StagingArena(pool, units)

    async def stop(self) -> None:
        self.healthy = False
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.migration:
            await self.migration.close()
        await self.executor.stop()
        if self._http is not None:
            await self._http.close()
        if self._tracing:
            self._tracing = False
            await tracing.shutdown()  # flushes the spans still queued

    async def _reap_sessions(self) -> None:
        period = max(0.05, min(1.0, self.settings.preserve_ttl / 4))
        while True:
            await asyncio.sleep(period)
            expired = self.sessions.expire()
            if expired:
                log.info("freed %d preserved prefill session(s) past their %.0f s TTL", expired,
                         self.settings.preserve_ttl)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ----------------------------------------------------------------------------------
    def free_cache(self, req: CacheFreeRequest) -> None:
        self.free_cache_calls_total += 1
        self.sessions.free(req.remote_session_id)

    async def generate(self, req: SamplingRequest, key_plan: list[tuple[int, int]] | None = None
                       ) -> AsyncIterator[Step]:
        """Validate, then run; raises ApiError before the first Step for anything wrong. `key_plan`: the
        request's prefix keys (distserve.engine.prefix_cache.key_plan), registered once its prompt's blocks
        are cached (at the first step: the prompt is computed or migrated by then). Its root is announced as
        pending from admission until the request ends (prefix_cache.CacheEvents.admit)."""
        first = True
        pending = self.cache_events.admit(key_plan) if key_plan else None
        try:
            async with aclosing(self._generate(req)) as steps:
                async for step in steps:
                    if first and key_plan:
                        first = False
                        self.cache_events.register(key_plan, req.prompt_ids)
                    yield step
        finally:  # ended, failed or cancelled: the pending mark goes (a root it cached stays a root)
            if pending is not None:
                self.cache_events.release(pending)

    async def _generate(self, req: SamplingRequest) -> AsyncIterator[Step]:
        total_blocks = blocks_for(len(req.prompt_ids) + 1, self.model.block_size)
        if total_blocks > self.model.num_blocks:
            raise ApiError(400, f"the prompt needs {total_blocks} KV blocks; this engine has {self.model.num_blocks}",
                           "context_length_exceeded")
        if req.migration is not None:
            async with aclosing(self._decode_migrated(req)) as steps:
                async for step in steps:
                    yield step
            return
        if req.preserve_cache and self.settings.role == EngineRole.Decode:
            raise ApiError(400, "a decode engine does not preserve prefill caches", "invalid_request")
        if tracing.ENABLED:
            async with aclosing(self._traced("prefill" if req.preserve_cache else "generate", req, None)) as steps:
                async for step in steps:
                    yield step
            return
        async with aclosing(self.executor.run(req, None)) as steps:
            async for step in steps:
                yield step

    async def _traced(self, name: str, req: SamplingRequest, resume: Resume | None) -> AsyncIterator[Step]:
        """executor.run inside a span (a child of the request's server span; never made current: an async
        generator must not change its consumer's context). `first_token` marks the first step."""
        span = tracing.start_span(name, {"distserve.prompt_tokens": len(req.prompt_ids),
                                         "distserve.max_tokens": req.max_tokens})
        tokens, steps_seen, error = 0, 0, None
        try:
            async with aclosing(self.executor.run(req, resume)) as steps:
                async for step in steps:
                    if not steps_seen:
                        span.add_event("first_token")
                    steps_seen += 1
                    tokens += len(step.token_ids)
                    if step.session_id is not None:
                        span.set_attribute("distserve.session_id", step.session_id)
                    yield step
        except ApiError as exc:
            error = exc.message
            raise
        finally:
            span.set_attribute("distserve.completion_tokens", tokens)
            tracing.end(span, error=error)

    async def _decode_migrated(self, req: SamplingRequest) -> AsyncIterator[Step]:
        mig = req.migration
        assert mig is not None and self.migration is not None
        if self.settings.role == EngineRole.Prefill:
            raise ApiError(400, "a prefill engine does not accept migration_request", "invalid_migration_request")
        try:
            peer = self.migration.check(mig, len(req.prompt_ids), self.model.block_size, self.model.vocab_size)
        except MigrationError as exc:
            raise ApiError(exc.status, exc.message, exc.code) from None
        deadline = time.monotonic() + self.settings.migration_deadline
        # The first k prompt blocks we already cache (an earlier turn, say) are not pulled: we read only
        # remote_block_ids[k:] (the wire is unchanged: the prompt tells us which blocks we hold).
        cached = self.cache_acquire(req.prompt_ids)
        k = len(cached)
        try:
            fresh = await self._allocate_wait(len(mig.remote_block_ids) - k, deadline)
        except BaseException:
            self.allocator.free(cached)
            raise
        handed_over = pulled = False
        try:
            try:
                # A packed copy holds every block layer by layer: a partial pull reads the blocks instead.
                await self.migration.pull(peer, mig.remote_block_ids[k:], fresh,
                                          on_quarantine_release=lambda b=fresh: self.allocator.free(b),
                                          remote_staging=mig.remote_kv_staging if k == 0 else None)
            except MigrationError as exc:
                if getattr(exc, "quarantined", False):
                    handed_over = True  # freed by the watcher once the late reads land (or never reused)
                raise ApiError(exc.status, exc.message, exc.code) from None
            # The prefill's blocks are ours now: free them on P (lmdeploy does this over ZMQ).
            self._spawn(self._free_remote(mig.remote_engine_id, peer.local_engine_id, mig.remote_session_id))
            handed_over = pulled = True
        finally:
            if not handed_over:
                self.allocator.free(fresh)
            if not pulled:
                self.allocator.free(cached)
        self.migration_blocks_reused_total += k
        blocks = cached + fresh
        self.cache_register(req.prompt_ids, blocks)
        resume = Resume(blocks=blocks, first_token=mig.remote_token_id)
        runner = self._traced("decode", req, resume) if tracing.ENABLED else self.executor.run(req, resume)
        async with aclosing(runner) as steps:
            async for step in steps:
                yield step

    async def _allocate_wait(self, n: int, deadline: float) -> list[int]:
        """Back-pressure: wait for free blocks until the deadline (then 503)."""
        delay = 0.002
        while True:
            blocks = self.allocator.allocate(n)
            if blocks is not None:
                return blocks
            if time.monotonic() >= deadline:
                raise ApiError(503, "no free KV blocks for the migration before its deadline", "kv_cache_full")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _free_remote(self, remote_url: str, our_id: str, session_id: int) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        headers = {"Authorization": f"Bearer {self.settings.peer_token}"} if self.settings.peer_token else {}
        body = {"remote_engine_id": our_id, "remote_session_id": session_id}
        span = None
        if tracing.ENABLED:  # this task copied the decode request's context: a child of its span
            span = tracing.start_span("free_cache call", {"url.full": remote_url, "distserve.session_id": session_id},
                                      kind="client")
            headers.update(tracing.headers_for(span))
        try:
            await self._free_remote_attempts(remote_url, headers, body, span)
        finally:
            if span is not None:
                span.end()

    async def _free_remote_attempts(self, remote_url: str, headers: dict, body: dict, span) -> None:
        for attempt in range(3):
            try:
                async with self._http.post(f"{remote_url.rstrip('/')}/distserve/free_cache", json=body,
                                           headers=headers) as resp:
                    if resp.status < 500:
                        if resp.status >= 400:
                            log.warning("free_cache on %s answered %d", remote_url, resp.status)
                            self.remote_frees_failed_total += 1
                        if span is not None:
                            span.set_attribute("http.response.status_code", resp.status)
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                log.info("free_cache on %s failed (%s), attempt %d", remote_url, exc, attempt + 1)
                if span is not None:
                    span.add_event("attempt_failed", {"message": str(exc)[:500] or type(exc).__name__})
            await asyncio.sleep(0.1 * (2 ** attempt) * (0.5 + random.random()))
        if span is not None:
            tracing.fail(span, "free_cache failed after 3 attempts")
        self.remote_frees_failed_total += 1  # the prefill's TTL frees it anyway

    def stats(self) -> dict:
        mig = self.migration.stats if self.migration else None
        return {
            "requests_running": self.executor.running,
            "requests_waiting": self.executor.waiting,
            "kv_blocks_used": self.allocator.num_used,
            "kv_blocks_free": self.allocator.num_free,
            "kv_blocks_total": self.allocator.total,
            "preserved_blocks": self.sessions.num_blocks,
            "preserved_sessions": self.sessions.num_sessions,
            "preserved_expired_total": self.sessions.expired_total,
            "prefill_tokens_pending": self.executor.prefill_tokens_pending,
            "handshakes_total": mig.handshakes_total if mig else 0,
            "migrations_total": mig.migrations_total if mig else 0,
            "migration_failures_total": mig.migration_failures_total if mig else 0,
            "migration_bytes_total": mig.migration_bytes_total if mig else 0,
            "migration_seconds_total": mig.migration_seconds_total if mig else 0.0,
            "quarantined_blocks": mig.quarantined_blocks if mig else 0,
            "migration_reads_total": mig.reads_total if mig else 0,
            "migrations_landed_total": mig.landed_total if mig else 0,
            "migrations_from_packed_total": mig.packed_sources_total if mig else 0,
            "kv_packs_total": self.staging.packs_total if self.staging else 0,
            "staging_blocks_used": self.staging.units_used if self.staging else 0,
            "staging_blocks_total": self.staging.units if self.staging else 0,
            "peers": len(self.migration.peers) if self.migration else 0,
            "decode_steps_total": getattr(self.executor, "decode_steps_total", 0),
            "decode_tokens_total": getattr(self.executor, "decode_tokens_total", 0),
            "preemptions_total": getattr(self.executor, "preemptions_total", 0),
            "prefill_seconds_total": getattr(self.executor, "prefill_seconds_total", 0.0),
            "prefill_computed_tokens_total": getattr(self.executor, "prefill_tokens_total", 0),
            "requests_total": self.requests_total,
            "request_errors_total": self.request_errors_total,
            "free_cache_total": self.free_cache_calls_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "prefix_cache_hit_tokens_total": self.prefix_cache_hit_tokens_total,
            "prefix_cache_blocks": self.allocator.num_cached,
            "prefix_cache_evictions_total": self.allocator.evictions_total,
            "prefix_cache_keys": self.cache_events.num_keys,
            "migration_blocks_reused_total": self.migration_blocks_reused_total,
        }


class NullExecutor(Executor):
    """Answers at once with a deterministic short text; keeps real KV bookkeeping (blocks, sessions)."""

    kind = "null"

    def __init__(self) -> None:
        self.engine: Engine | None = None

    async def start(self, engine: Engine) -> None:
        self.engine = engine

    async def stop(self) -> None:
        pass

    @staticmethod
    def reply_tokens(prompt_ids: list[int]) -> list[int]:
        digest = hashlib.sha256(bytes(t & 0xFF for t in prompt_ids) + str(len(prompt_ids)).encode()).hexdigest()
        return tokenizer.encode(f" null reply {digest[:8]}.", add_bos=False)

    async def run(self, req: SamplingRequest, resume: Resume | None) -> AsyncIterator[Step]:
        engine = self.engine
        assert engine is not None
        bs = engine.model.block_size
        reply = self.reply_tokens(req.prompt_ids)
        if resume is not None:
            blocks = resume.blocks
        else:
            cached = engine.cache_acquire(req.prompt_ids)
            try:
                blocks = cached + await engine._allocate_wait(blocks_for(len(req.prompt_ids), bs) - len(cached),
                                                              time.monotonic() + 30)
            except BaseException:
                engine.allocator.free(cached)
                raise
            engine.cache_register(req.prompt_ids, blocks)  # no KV to compute: "prefilled" at once
        self.running += 1
        keep = False
        try:
            limit = min(req.max_tokens, len(reply) + (0 if req.ignore_eos else 1))
            out: list[int] = []
            for i in range(limit):
                token = reply[i % len(reply)] if (i < len(reply) or req.ignore_eos) else tokenizer.EOS
                if i == 0 and resume is not None:
                    token = resume.first_token
                out.append(token)
                if token == tokenizer.EOS and not req.ignore_eos:
                    break
            finish = "stop" if out and out[-1] == tokenizer.EOS and not req.ignore_eos else "length"
            if req.preserve_cache:
                session = engine.sessions.new_session_id()
                engine.sessions.add(session, blocks)
                keep = True
                yield Step(out, finish, cache_block_ids=list(blocks), session_id=session)
            else:
                yield Step(out, finish, cache_block_ids=list(blocks))
        finally:
            self.running -= 1
            if not keep:
                engine.allocator.free(blocks)
