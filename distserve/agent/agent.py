"""The engine agent: represents one engine in etcd (docs/agent.md).

Lifecycle:
1. wait until the engine answers /health, /distserve/engine_info and /v1/models;
2. read the operator flags (state/<id>); while `drain` is set, stay unregistered;
3. register: a LeaseSession (TTL `ttl`), the engine record (state "starting"), the load record, and on a
   decode engine the link manager (adopting a predecessor's links first); then state "ready";
4. probe the engine every second (unhealthy after `unhealthy_after` without an answer; a new engine
   process is a new incarnation), publish load on change, follow the flags;
5. drain: state "draining"; once in-flight work stays at zero for `drain_quiet`, deregister (revoke the
   lease, drop the links) and wait for the flag to be cleared, then register again (step 3);
6. stop: announce it (state "draining", reason "stopping"), revoke the lease (records vanish at once),
   then tear down.

The incarnation is `<instance>.<lease id in hex>`: `instance` names the engine process (the reference
engine's `instance_id`, lmdeploy's process start time from /metrics, else an id the agent draws and
renews after the engine was unreachable), so it changes when the engine or the lease is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any

import aiohttp

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from discovery.informer import Informer
from discovery.lease import LeaseSession
from distserve import __version__
from distserve.agent.config import AgentConfig
from distserve.agent.engine_client import EngineClient, EngineError, EngineFacts, instance_from
from distserve.agent.links import HandshakeLimiter, LinkManager
from distserve.agent.load import LoadPublisher
from distserve.keys import ENGINES, LINKS, Keys
from distserve.protocol import geometry
from distserve.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags, TransferInfo, TransferRank

log = logging.getLogger("distserve.agent")

ENGINE_KINDS = ("reference", "lmdeploy", "null")


class AgentConfigError(Exception):
    """The agent cannot represent this engine as configured (a one-line message for the CLI)."""


class Agent:
    """One engine's agent. `await start()`, then `await stop()` (or `run()` until cancelled)."""

    def __init__(self, config: AgentConfig, etcd: EtcdConfig | None = None, *, client: EtcdClient | None = None,
                 handshake_semaphore: HandshakeLimiter | None = None) -> None:
        self.config = config
        self.keys = Keys(config.cluster)
        self._etcd_config = etcd
        self._own_client = client is None
        self.client: EtcdClient | None = client
        self._handshake_semaphore = handshake_semaphore
        self.http: aiohttp.ClientSession | None = None
        self.engine: EngineClient | None = None

        # What we know of the engine.
        self.facts: EngineFacts | None = None
        self.instance: str | None = None
        self.instance_seen_at: float = 0.0
        self.healthy = True
        self.health_reason: str | None = None
        self._last_ok = 0.0
        self._refused_since_ok = False

        # etcd side.
        self.flags = OperatorFlags()
        self.session: LeaseSession | None = None
        self.record: EngineRecord | None = None  # what etcd holds for us (last successful put)
        self.phase = "waiting-engine"  # waiting-engine | registered | drained | stopped
        self.registered = asyncio.Event()
        self.deregistered = asyncio.Event()
        self.links: LinkManager | None = None
        self.load: LoadPublisher | None = None
        self.prefills: dict[str, EngineRecord] = {}
        self._setup_done = False
        self._flags_informer: Informer[OperatorFlags] | None = None
        self._engines_informer: Informer[EngineRecord] | None = None
        self._flags_changed = asyncio.Event()
        self._record_dirty = asyncio.Event()
        self._record_lock = asyncio.Lock()
        self._main_task: asyncio.Task | None = None
        self._epoch_tasks: list[asyncio.Task] = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # --- public lifecycle ------------------------------------------------------------------------------
    async def start(self) -> "Agent":
        if self.client is None:
            self.client = EtcdClient(self._etcd_config or EtcdConfig.from_env())
        await self.client.connect()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, limit_per_host=32))
        self.engine = EngineClient(self.http, self.config.engine_url, self.config.token, self.config.http_timeout)
        self._main_task = asyncio.create_task(self._main(), name=f"agent-{self.config.id}")
        self._main_task.add_done_callback(self._main_done)
        return self

    def _main_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, AgentConfigError):
                log.error("agent %s: %s", self.config.id, exc)
            else:
                log.error("agent %s failed", self.config.id, exc_info=exc)

    async def wait_registered(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.registered.wait(), timeout)

    async def run(self) -> None:
        """Until the agent fails for a reason it cannot recover from (bad configuration) or is cancelled."""
        assert self._main_task is not None, "start() first"
        await self._main_task

    async def stop(self) -> None:
        """Graceful: revoke the lease first (peers and routers see us go at once), then tear down."""
        if self._stopping:
            return
        self._stopping = True
        tasks = [t for t in (self._main_task, *self._epoch_tasks, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await _bounded(asyncio.gather(*tasks, return_exceptions=True), 5.0, "cancelling tasks")
        links = self.links
        held = (await _bounded(links.close(), 5.0, "stopping link workers") or []) if links is not None else []
        if self.session is not None and self.record is not None and not self.config.keep_on_exit:
            # One last put saying "draining: stopping", so watchers (distserve-ctl watch) can tell this
            # graceful revoke from a lease that expired; bounded so a dead etcd does not delay the stop.
            await _bounded(self._write_record_now(), 0.5, "announcing the stop")
        session, self.session = self.session, None
        if session is not None:
            await _bounded(session.close(revoke=not self.config.keep_on_exit), 5.0, "revoking the lease")
        if links is not None and held and not self.config.keep_on_exit:
            # The records are gone; clear the engines' side of our links too (bounded, best effort).
            await _bounded(links.drop_on_engines(held), 3.0, "dropping links on the engines")
        for informer in (self._flags_informer, self._engines_informer):
            if informer is not None:
                await _bounded(informer.stop(), 2.0, "stopping a watch")
        if self.http is not None:
            await _bounded(self.http.close(), 2.0, "closing HTTP connections")
        if self._own_client and self.client is not None:
            await _bounded(self.client.close(), 2.0, "closing the etcd client")
        self.phase = "stopped"
        log.info("agent %s stopped", self.config.id)

    # --- main flow -------------------------------------------------------------------------------------
    async def _main(self) -> None:
        log.info("%s", self.config.describe())
        self.facts = await self._wait_for_engine()
        self._check_engine(self.facts)
        self._new_instance(self.facts)
        await self._start_flags()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="agent-probe"))
        self._tasks.append(asyncio.create_task(self._record_writer(), name="agent-record"))
        if self.config.role == "decode":
            await self._start_engines_informer()
        self._tasks.append(asyncio.create_task(self._etcd_watchdog(), name="agent-etcd-watchdog"))
        while True:
            if self.flags.drain:
                if self.phase != "drained":
                    log.info("agent %s: drain flag set, staying unregistered until it is cleared", self.config.id)
                self.phase = "drained"
                self.deregistered.set()
                while self.flags.drain:
                    await self._flags_changed.wait()
                    self._flags_changed.clear()
            self.deregistered.clear()
            await self._register()
            await self.deregistered.wait()

    async def _wait_for_engine(self) -> EngineFacts:
        assert self.engine is not None
        attempt, last_logged = 0, 0.0
        while True:
            try:
                await self.engine.health(timeout=self.config.probe_timeout)
                facts = await self.engine.facts(timeout=self.config.http_timeout)
                self._last_ok = time.monotonic()
                log.info("engine %s answers: models %s, %s", self.config.engine_url, facts.models,
                         facts.config.model_dump(exclude_none=True))
                return facts
            except EngineError as exc:
                if exc.status in (401, 403):
                    raise AgentConfigError(
                        f"engine {self.config.engine_url} refused the agent (HTTP {exc.status}): give the agent one "
                        f"of the engine's API keys (--cluster-token or DISTSERVE_CLUSTER_TOKEN)") from None
                attempt += 1
                if time.monotonic() - last_logged > 10:
                    log.info("waiting for engine %s: %s", self.config.engine_url, exc)
                    last_logged = time.monotonic()
            await asyncio.sleep(min(self.config.probe_interval, 0.2 * attempt))

    def _check_engine(self, facts: EngineFacts) -> None:
        role = facts.extras.get("role")
        if isinstance(role, str) and role.lower() != self.config.role:
            raise AgentConfigError(f"engine {self.config.engine_url} says role {role!r} but the agent was "
                                   f"started with --role {self.config.role}")
        if not facts.models:
            raise AgentConfigError(f"engine {self.config.engine_url} serves no model (/v1/models is empty)")

    def _new_instance(self, facts: EngineFacts) -> None:
        self.instance = facts.instance_id or f"a-{uuid.uuid4().hex[:12]}"
        started = facts.extras.get("started_at")
        self.instance_seen_at = float(started) if isinstance(started, (int, float)) else time.time()

    # --- registration epochs --------------------------------------------------------------------------
    async def _register(self) -> None:
        assert self.client is not None
        self._setup_done = False
        attempt = 0
        while True:
            session = LeaseSession(self.client, ttl=self.config.ttl, name=f"agent-{self.config.id}")
            session.on_new_lease(self._on_new_lease)
            try:
                await session.start()
                break
            except Exception as exc:  # noqa: BLE001 - etcd unreachable: keep trying, never exit
                attempt += 1
                log.warning("agent %s: cannot get a lease yet (%s); retrying", self.config.id, exc)
                with contextlib.suppress(Exception):
                    await session.close(revoke=False)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.5))
        self.session = session
        await self._write_record_now()
        assert self.engine is not None
        self.load = LoadPublisher(self.engine, self.config.id, self.config.load_interval, self._put_load,
                                  self._num_gpu_blocks, timeout=min(self.config.http_timeout, 2.0))
        self._epoch_tasks = [asyncio.create_task(self.load.run(), name="agent-load"),
                             asyncio.create_task(self._drain_loop(), name="agent-drain")]
        if self.config.role == "decode":
            self.links = LinkManager(config=self.config, keys=self.keys, http=self.http, me=lambda: self.record,
                                     prefills=lambda: self.prefills, put=self._put_owned, delete=self._delete_key,
                                     semaphore=self._handshake_semaphore)
            self.links.adopt_candidates(await self._predecessor_links())
            self.links.wake_all()
        self._setup_done = True
        self.phase = "registered"
        self._mark_dirty()
        await self._write_record_now()
        self.registered.set()

    async def _deregister(self, reason: str) -> None:
        """End this registration epoch: revoke the lease (the records vanish together), drop our links."""
        log.info("agent %s deregistering: %s", self.config.id, reason)
        current = asyncio.current_task()
        for task in self._epoch_tasks:
            if task is not current:
                task.cancel()
        await _bounded(asyncio.gather(*(t for t in self._epoch_tasks if t is not current), return_exceptions=True),
                       5.0, "cancelling tasks")
        self._epoch_tasks = []
        links, self.links = self.links, None
        held = (await _bounded(links.close(), 5.0, "stopping link workers") or []) if links is not None else []
        session, self.session = self.session, None
        if session is not None:
            await _bounded(session.close(revoke=True), 5.0, "revoking the lease")
        if links is not None and held:
            await _bounded(links.drop_on_engines(held), 5.0, "dropping links on the engines")
        self.record = None
        self.load = None
        self.registered.clear()
        self.phase = "drained"
        self.deregistered.set()

    async def _predecessor_links(self) -> dict[str, LinkRecord]:
        """links/*/<me> found in etcd (an earlier agent of this engine wrote them): adoption candidates."""
        assert self.client is not None
        kvs, _ = await self._retry(lambda: self.client.get_prefix(self.keys.prefix(LINKS)))
        found: dict[str, LinkRecord] = {}
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if parsed is None or parsed.ids[1] != self.config.id:
                continue
            try:
                found[parsed.ids[0]] = LinkRecord.decode(kv.value)
            except Exception:  # noqa: BLE001 - unreadable: never adopted, so the link manager deletes it
                found[parsed.ids[0]] = LinkRecord(prefill_id=parsed.ids[0], decode_id=self.config.id,
                                                  prefill_incarnation="", decode_incarnation="", state="failed")
        return found

    async def _on_new_lease(self, lease_id: int) -> None:
        """A new lease (the first one, or a replacement after a loss): a new incarnation.

        Called by the LeaseSession before it re-puts our keys, with its lock held: session.put() here only
        replaces the value that re-put writes, so the engine record and our link records come back with the
        new incarnation at once. No task may be created here (it would inherit the recovery context)."""
        session = self.session
        if session is None:  # the first lease, from _register(): it writes the record itself
            return
        log.warning("agent %s: lease replaced (new lease %x): new incarnation", self.config.id, lease_id)
        record = self.build_record()
        if record is not None:
            await session.put(self.keys.engine(self.config.id), record.encode())
            self.record = record
            if self.links is not None:
                await self.links.rewrite_records(record)
        if self.load is not None:
            self.load.reset()
        self._mark_dirty()

    # --- the engine record -----------------------------------------------------------------------------
    def build_record(self) -> EngineRecord | None:
        session, facts = self.session, self.facts
        if session is None or facts is None or session.lease_id is None:
            return None
        extras = facts.extras
        engine_kind = extras.get("engine_kind")
        if engine_kind not in ENGINE_KINDS:
            engine_kind = "lmdeploy"
        info = geometry(facts.config)
        if isinstance(extras.get("kv_layout"), str):
            info.kv_layout = extras["kv_layout"]
        return EngineRecord(
            id=self.config.id,
            incarnation=f"{self.instance}.{session.lease_id:x}",
            instance=self.instance,
            role=self.config.role,
            url=self.config.url,
            models=list(facts.models),
            engine_info=info,
            transfer=self._transfer_info(facts, engine_kind),
            state=self._state(),
            engine_kind=engine_kind,
            software_version=str(extras.get("software_version") or extras.get("version")
                                 or self.config.software_version or ""),
            agent_version=f"distserve-agent {__version__}",
            started_at=self.instance_seen_at,
            registered_at=self.record.registered_at if self.record else time.time(),
            state_reason=self._state_reason(),
            # only a well-formed value: routers reject requests by it
            max_model_len=mml if type(mml := extras.get("max_model_len")) is int and mml > 0 else None,
            max_token_bytes=mtb if type(mtb := extras.get("max_token_bytes")) is int and 0 < mtb <= 1024 else None,
        )

    def _transfer_info(self, facts: EngineFacts, engine_kind: str) -> TransferInfo:
        reported = facts.extras.get("transfer")
        if isinstance(reported, dict):
            try:
                info = TransferInfo.model_validate(reported)
                return info.model_copy(update={"protocol": self.config.protocol}) if self.config.protocol else info
            except Exception:  # noqa: BLE001 - fall back to what the agent knows
                log.warning("engine %s reports unreadable transfer facts; using the agent's", self.config.engine_url)
        reported_protocol = facts.extras.get("migration_protocol")
        if reported_protocol not in ("tcp", "rdma", "nvlink"):
            reported_protocol = None
        protocol = self.config.protocol or reported_protocol or (
            "tcp" if engine_kind in ("reference", "null") else "rdma")
        host = self.config.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        devices = self.config.rdma_devices
        ranks = [TransferRank(rank=r, host=host, nics=[devices[r % len(devices)]] if devices else [])
                 for r in range(facts.config.tp_size)]
        return TransferInfo(protocol=protocol, ranks=ranks)

    def _state(self) -> str:
        if self._stopping:
            return "draining"
        if not self.healthy:
            return "unhealthy"
        if self.flags.drain:
            return "draining"
        if not self._setup_done:
            return "starting"
        return "ready"

    def _state_reason(self) -> str | None:
        if self._stopping:
            return "stopping"
        if not self.healthy:
            return self.health_reason
        if self.flags.drain:
            return self.flags.reason or "drain requested"
        return None

    def _mark_dirty(self) -> None:
        self._record_dirty.set()

    async def _record_writer(self) -> None:
        """The only writer of our engine record: coalesces changes, retries with back-off."""
        attempt = 0
        while True:
            await self._record_dirty.wait()
            self._record_dirty.clear()
            try:
                await self._write_record_now()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd unavailable: try again
                attempt += 1
                log.warning("agent %s: writing the engine record failed: %s", self.config.id, exc)
                await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.5))
                self._record_dirty.set()

    async def _write_record_now(self) -> None:
        async with self._record_lock:  # one put at a time, so an older value never lands after a newer one
            record = self.build_record()
            session = self.session
            if record is None or session is None:
                return
            if self.record is not None and _same_record(self.record, record):
                return
            await session.put(self.keys.engine(self.config.id), record.encode())
            previous, self.record = self.record, record
        if previous is None or (previous.state, previous.incarnation) != (record.state, record.incarnation):
            log.info("engine %s registered: state %s, incarnation %s", record.id, record.state, record.incarnation)
        if self.links is not None:
            self.links.wake_all()

    async def _put_record_forced(self) -> None:
        """Put our record even if unchanged. If the lease was replaced while this put waited, what we wrote
        names the old incarnation: remembering it as written makes the record writer correct it at once."""
        async with self._record_lock:
            record, session = self.build_record(), self.session
            if record is None or session is None:
                return
            try:
                await session.put(self.keys.engine(self.config.id), record.encode())
            finally:
                self.record = record
                self._mark_dirty()

    # --- writes under the lease --------------------------------------------------------------------------
    async def _put_owned(self, key: str, value: bytes) -> None:
        session = self.session
        if session is None:
            raise RuntimeError("not registered")
        await session.put(key, value)

    async def _delete_key(self, key: str) -> None:
        session = self.session
        if session is not None:
            await session.delete(key)
        elif self.client is not None:
            await self.client.delete(key)

    async def _put_load(self, record: LoadRecord) -> None:
        await self._put_owned(self.keys.load(self.config.id), record.encode())

    def _num_gpu_blocks(self) -> int | None:
        return self.facts.config.num_gpu_blocks if self.facts else None

    # --- liveness ---------------------------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self._probe_once()
            await asyncio.sleep(max(0.0, self.config.probe_interval - (loop.time() - started)))

    async def _probe_once(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.health(timeout=self.config.probe_timeout)
            config, extras = await self.engine.engine_info(timeout=self.config.probe_timeout)
        except EngineError as exc:
            if exc.refused:
                self._refused_since_ok = True
            if self.healthy and time.monotonic() - self._last_ok >= self.config.unhealthy_after:
                self.healthy = False
                self.health_reason = str(exc)
                log.warning("engine %s unhealthy: %s", self.config.id, exc)
                self._mark_dirty()
            return
        # Nothing listened on the port meanwhile: the process went away (a SIGSTOPped or overloaded engine
        # times out instead, and keeps its identity).
        was_down = self._refused_since_ok
        down_for = time.monotonic() - self._last_ok
        self._last_ok = time.monotonic()
        facts = self.facts
        restarted = False
        if facts is not None:
            metrics = None
            if "instance_id" not in extras and (self.instance or "").startswith("pst-"):
                with contextlib.suppress(EngineError):
                    metrics = await self.engine.metrics(timeout=self.config.probe_timeout)
            reported = instance_from(extras, metrics)
            if reported is not None:
                restarted = reported != self.instance
            elif was_down:
                restarted = True  # no identity exposed (lmdeploy without metrics): an outage means a new process
            if config.model_dump() != facts.config.model_dump():
                restarted = True
        if restarted:
            try:
                fresh = await self.engine.facts(timeout=self.config.http_timeout)
            except EngineError as exc:
                log.info("engine %s answered but its facts did not: %s", self.config.id, exc)
                return
            if fresh.instance_id is None or fresh.instance_id != self.instance:
                previous = self.instance
                self.facts = fresh
                self._new_instance(fresh)
                log.warning("engine %s restarted (instance %s -> %s): new incarnation", self.config.id, previous,
                            self.instance)
                self._mark_dirty()
        self._refused_since_ok = False
        if not self.healthy:
            self.healthy = True
            self.health_reason = None
            log.info("engine %s healthy again (after %.1fs)", self.config.id, down_for)
            self._mark_dirty()

    # --- operator flags ---------------------------------------------------------------------------------
    async def _start_flags(self) -> None:
        assert self.client is not None
        key = self.keys.state(self.config.id)

        def decode(k: str, raw: bytes) -> OperatorFlags:
            return OperatorFlags.decode(raw)

        def on_change(kind: str, k: str, old: Any, new: Any) -> None:
            if k != key:
                return
            flags = new if kind == "put" and new is not None else OperatorFlags()
            if (flags.drain, flags.cordon) != (self.flags.drain, self.flags.cordon):
                log.info("engine %s operator flags: drain=%s cordon=%s (%s)", self.config.id, flags.drain,
                         flags.cordon, flags.reason or "no reason given")
            self.flags = flags
            self._flags_changed.set()
            self._mark_dirty()

        self._flags_informer = Informer(self.client, key, decode, name=f"flags-{self.config.id}")
        self._flags_informer.add_listener(on_change)
        await self._flags_informer.start()
        while True:
            try:
                await self._flags_informer.wait_synced(timeout=10)
                return
            except TimeoutError:
                log.warning("agent %s: etcd not reachable yet (%s); still trying", self.config.id,
                            ",".join(self.client.endpoints))

    async def _start_engines_informer(self) -> None:
        """The decode side's view of engines/ (prefill records only matter). Also used to re-list at once
        after an etcd outage: the old informer stops, a fresh one lists at the current revision."""
        assert self.client is not None

        def decode(k: str, raw: bytes) -> EngineRecord:
            return EngineRecord.decode(raw)

        def on_change(kind: str, key: str, old: EngineRecord | None, new: EngineRecord | None) -> None:
            parsed = self.keys.parse(key)
            if parsed is None or parsed.kind != ENGINES:
                return
            engine_id = parsed.ids[0]
            if engine_id == self.config.id:
                return
            if kind == "put" and new is not None and new.role == "prefill":
                if self.prefills.get(engine_id) == new:
                    return
                self.prefills[engine_id] = new
            elif engine_id in self.prefills:
                del self.prefills[engine_id]
            else:
                return
            if self.links is not None:
                self.links.wake(engine_id)

        previous, self._engines_informer = self._engines_informer, None
        if previous is not None:
            await previous.stop()
        informer: Informer[EngineRecord] = Informer(self.client, self.keys.prefix(ENGINES), decode, name="engines")
        informer.add_listener(on_change)
        await informer.start()
        self._engines_informer = informer
        while True:
            try:
                await informer.wait_synced(timeout=10)
                break
            except TimeoutError:
                log.warning("agent %s: engines view not synced yet; still trying", self.config.id)
        # A re-list only reports what exists: forget prefills that vanished meanwhile.
        present = {self.keys.parse(k).ids[0] for k in informer.items() if self.keys.parse(k) is not None}
        for engine_id in [e for e in self.prefills if e not in present]:
            del self.prefills[engine_id]
            if self.links is not None:
                self.links.wake(engine_id)

    async def _etcd_watchdog(self) -> None:
        """Speed up the return after an etcd outage longer than the TTL.

        The lease session and the watches retry with jittered back-off (up to ~2 s apart). While our lease is
        unconfirmed, ask etcd every 0.25 s; the moment it answers, (1) if the lease is gone, a put under it
        makes the session replace it now, and (2) the decode side re-lists engines/ at once instead of waiting
        for its watch to come back."""
        while True:
            await asyncio.sleep(0.25)
            session = self.session
            if session is None or session.alive or self.client is None:
                continue
            try:
                ttl_left = await self.client.time_to_live(session.lease_id, timeout=0.5)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - still unreachable
                continue
            log.info("agent %s: etcd answers again (lease %s)", self.config.id,
                     "gone" if ttl_left < 0 else f"held, {ttl_left}s left")
            if ttl_left < 0 and self.session is session:
                with contextlib.suppress(Exception):
                    await self._put_record_forced()  # under the lost lease: the session replaces it now
            if self.config.role == "decode":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._start_engines_informer(), 10)

    # --- drain ------------------------------------------------------------------------------------------
    async def _drain_loop(self) -> None:
        """While drain is set: wait for in-flight work to reach zero (and stay there), then deregister."""
        zero_since: float | None = None
        drain_since: float | None = None
        while True:
            if not self.flags.drain:
                zero_since = drain_since = None
                await self._flags_changed.wait()
                self._flags_changed.clear()
                continue
            now = time.monotonic()
            drain_since = drain_since or now
            load = self.load
            if load is not None and load.known and load.latest is not None:
                idle = load.latest.in_flight == 0 and not (load.latest.preserved_blocks or 0)
                zero_since = (zero_since or now) if idle else None
                done = zero_since is not None and now - zero_since >= self.config.drain_quiet
            else:
                done = now - drain_since >= self.config.drain_unknown_grace
            if done:
                await self._deregister("drained: no work in flight")
                return
            await asyncio.sleep(min(0.25, self.config.load_interval))

    async def _retry(self, call, attempts: int = 1_000_000):
        attempt = 0
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd briefly unavailable
                attempt += 1
                if attempt >= attempts:
                    raise
                log.warning("agent %s: etcd call failed (%s); retrying", self.config.id, exc)
                await asyncio.sleep(min(2.0, 0.1 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.5))


async def _bounded(awaitable, timeout: float, what: str):
    """Await a shutdown step, but never let one step hang the stop (logged, then skipped)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        log.warning("agent stop: %s took longer than %.0fs; skipped", what, timeout)
    except Exception as exc:  # noqa: BLE001 - shutdown goes on
        log.warning("agent stop: %s failed: %s", what, exc)
    return None


def _same_record(a: EngineRecord, b: EngineRecord) -> bool:
    skip = {"registered_at"}
    return a.model_dump(exclude=skip) == b.model_dump(exclude=skip)
