"""The engine agent: represents one engine in etcd (docs/agent.md).

Lifecycle:
1. wait until the engine answers /health, /distserve/engine_info and /v1/models (liveness.py);
2. read the operator flags (state/<id>, watches.py); while `drain` is set, stay unregistered;
3. register (registration.py): a lease (TTL `ttl`), the engine record (state "starting"), the load record
   (load.py), and on a decode engine the link manager (links.py, adopting a predecessor's links first);
   then state "ready";
4. probe the engine every second (unhealthy after `unhealthy_after` without an answer; a new engine
   process is a new incarnation), publish load on change, follow the flags;
5. drain (drain.py): state "draining"; once in-flight work stays at zero for `drain_quiet`, deregister
   (revoke the lease, drop the links) and wait for the flag to be cleared, then register again (step 3);
6. stop: announce it (state "draining", reason "stopping"), revoke the lease (records vanish at once),
   then tear down.

The incarnation is `<instance>.<lease id in hex>`: `instance` names the engine process (the reference
engine's `instance_id`, lmdeploy's process start time from /metrics, else an id the agent draws and
renews after the engine was unreachable), so it changes when the engine or the lease is new.

`Agent` only composes those parts: it creates them, owns their tasks and cancels them on stop.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from discovery.backoff import Backoff, retry
from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.agent.config import AgentConfig, AgentConfigError
from distserve.agent.drain import drain_when_flagged
from distserve.agent.engine_client import EngineClient
from distserve.agent.links import HandshakeLimiter, LinkManager
from distserve.agent.liveness import EngineLiveness
from distserve.agent.load import LoadPublisher
from distserve.agent.record import EngineStatus, build_engine_record
from distserve.agent.registration import FOREVER, Registration
from distserve.agent.watches import ClusterWatch
from distserve.cluster.codec import Codec
from distserve.cluster.keys import LINKS, Keys
from distserve.cluster.records import EngineRecord, LinkRecord, LoadRecord, OperatorFlags

log = logging.getLogger("distserve.agent")

__all__ = ["Agent", "AgentConfigError"]

ETCD_BACK_RELIST_TIMEOUT = 10.0  # the decode side's fresh list of engines/ after an etcd outage


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

        # The parts (created in start() and _main(); a registration and its links/load per epoch).
        self.liveness: EngineLiveness | None = None
        self.watch: ClusterWatch | None = None
        self.registration: Registration | None = None
        self.links: LinkManager | None = None
        self.load: LoadPublisher | None = None

        self.phase = "waiting-engine"  # waiting-engine | registered | drained | stopped
        self.registered = asyncio.Event()
        self.deregistered = asyncio.Event()
        self._setup_done = False
        self._main_task: asyncio.Task | None = None
        self._epoch_tasks: list[asyncio.Task] = []  # this registration's (load, drain)
        self._tasks: list[asyncio.Task] = []  # the agent's lifetime (probe)
        self._stopping = False

    @property
    def record(self) -> EngineRecord | None:
        """What etcd holds for us (the last successful put), None while unregistered."""
        return self.registration.record if self.registration is not None else None

    @property
    def flags(self) -> OperatorFlags:
        return self.watch.flags if self.watch is not None else OperatorFlags()

    @property
    def prefills(self) -> dict[str, EngineRecord]:
        return self.watch.prefills if self.watch is not None else {}

    # --- public lifecycle ------------------------------------------------------------------------------
    async def start(self) -> "Agent":
        if self.client is None:
            self.client = EtcdClient(self._etcd_config or EtcdConfig.from_env())
        await self.client.connect()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, limit_per_host=32))
        self.engine = EngineClient(self.http, self.config.engine_url, self.config.token, self.config.http_timeout)
        self.liveness = EngineLiveness(self.config, self.engine, on_change=self._mark_dirty)
        self.watch = ClusterWatch(self.client, self.keys, self.config.id, watch_engines=self.config.role == "decode",
                                  on_flags=self._mark_dirty, on_prefill=self._wake_link)
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
        registration, links = self.registration, self.links
        keep = self.config.keep_on_exit
        if registration is not None:
            await _bounded(registration.stop_writer(), 2.0, "stopping the record writer")
        held = (await _bounded(links.close(), 5.0, "stopping link workers") or []) if links is not None else []
        if registration is not None:
            if registration.record is not None and not keep:
                # One last put saying "draining: stopping", so watchers (distserve-ctl watch) can tell this
                # graceful revoke from a lease that expired; bounded so a dead etcd does not delay the stop.
                await _bounded(registration.write_now(), 0.5, "announcing the stop")
            await _bounded(registration.release(revoke=not keep), 5.0, "revoking the lease")
        if links is not None and held and not keep:
            # The records are gone; clear the engines' side of our links too (bounded, best effort).
            await _bounded(links.drop_on_engines(held), 3.0, "dropping links on the engines")
        if self.watch is not None:
            await _bounded(self.watch.close(), 2.0, "stopping the watches")
        if self.http is not None:
            await _bounded(self.http.close(), 2.0, "closing HTTP connections")
        if self._own_client and self.client is not None:
            await _bounded(self.client.close(), 2.0, "closing the etcd client")
        self.phase = "stopped"
        log.info("agent %s stopped", self.config.id)

    # --- main flow -------------------------------------------------------------------------------------
    async def _main(self) -> None:
        assert self.liveness is not None and self.watch is not None
        log.info("%s", self.config.describe())
        await self.liveness.wait_ready()
        await self.watch.start()
        self._tasks.append(asyncio.create_task(self.liveness.run(), name=f"agent-probe-{self.config.id}"))
        while True:
            if self.watch.flags.drain:
                if self.phase != "drained":
                    log.info("agent %s: drain flag set, staying unregistered until it is cleared", self.config.id)
                self.phase = "drained"
                self.deregistered.set()
                await self.watch.wait_flags(lambda flags: not flags.drain)
            self.deregistered.clear()
            await self._register()
            await self.deregistered.wait()

    # --- registration epochs --------------------------------------------------------------------------
    async def _register(self) -> None:
        assert self.client is not None and self.engine is not None and self.watch is not None
        self._setup_done = False
        registration = Registration(self.config, self.keys, self.client, self._build_record,
                                    on_written=self._record_written, on_new_incarnation=self._new_incarnation,
                                    on_etcd_back=self._etcd_back)
        await registration.start()
        self.registration = registration
        self.load = LoadPublisher(self.engine, self.config.id, self.config.load_interval, self._put_load,
                                  self._num_gpu_blocks, timeout=min(self.config.http_timeout, 2.0))
        self._epoch_tasks = [
            asyncio.create_task(self.load.run(), name=f"agent-load-{self.config.id}"),
            asyncio.create_task(drain_when_flagged(self.config, self.watch, lambda: self.load, self._deregister),
                                name=f"agent-drain-{self.config.id}"),
        ]
        if self.config.role == "decode":
            self.links = LinkManager(config=self.config, keys=self.keys, http=self.http, me=lambda: self.record,
                                     prefills=lambda: self.prefills, put=registration.put,
                                     delete=registration.delete, semaphore=self._handshake_semaphore)
            self.links.adopt_candidates(await self._predecessor_links())
            self.links.wake_all()
        self._setup_done = True
        self.phase = "registered"
        registration.mark_dirty()
        await registration.write_now()
        self.registered.set()

    async def _deregister(self, reason: str) -> None:
        """End this registration epoch: revoke the lease (the records vanish together), drop our links."""
        log.info("agent %s deregistering: %s", self.config.id, reason)
        current = asyncio.current_task()
        others = [t for t in self._epoch_tasks if t is not current]
        for task in others:
            task.cancel()
        await _bounded(asyncio.gather(*others, return_exceptions=True), 5.0, "cancelling tasks")
        self._epoch_tasks = []
        registration, self.registration = self.registration, None
        if registration is not None:
            await _bounded(registration.stop_writer(), 2.0, "stopping the record writer")
        links, self.links = self.links, None
        held = (await _bounded(links.close(), 5.0, "stopping link workers") or []) if links is not None else []
        if registration is not None:
            await _bounded(registration.release(revoke=True), 5.0, "revoking the lease")
        if links is not None and held:
            await _bounded(links.drop_on_engines(held), 5.0, "dropping links on the engines")
        self.load = None
        self.registered.clear()
        self.phase = "drained"
        self.deregistered.set()

    async def _predecessor_links(self) -> dict[str, LinkRecord]:
        """links/*/<me> found in etcd (an earlier agent of this engine wrote them): adoption candidates."""
        assert self.client is not None
        client = self.client
        kvs, _ = await retry(
            lambda attempt: client.get_prefix(self.keys.prefix(LINKS)), attempts=FOREVER,
            backoff=Backoff(0.2, 2.0),
            on_retry=lambda attempt, exc, delay: log.warning(
                "agent %s: etcd call failed (%s); retrying", self.config.id, exc))
        codec = Codec(self.keys)
        found: dict[str, LinkRecord] = {}
        for kv in kvs:
            parsed = self.keys.parse(kv.key)
            if parsed is None or parsed.kind != LINKS or parsed.ids[1] != self.config.id:
                continue
            try:
                found[parsed.ids[0]] = codec.link(kv.key, kv.value)
            except Exception:  # noqa: BLE001 - unreadable: never adopted, so the link manager deletes it
                found[parsed.ids[0]] = LinkRecord(prefill_id=parsed.ids[0], decode_id=self.config.id,
                                                  prefill_incarnation="", decode_incarnation="", state="failed")
        return found

    # --- hooks the parts call --------------------------------------------------------------------------
    def _build_record(self, lease_id: int, previous: EngineRecord | None) -> EngineRecord | None:
        live, watch = self.liveness, self.watch
        if live is None or watch is None or live.facts is None or live.instance is None:
            return None
        status = EngineStatus(stopping=self._stopping, healthy=live.healthy, health_reason=live.health_reason,
                              flags=watch.flags, setup_done=self._setup_done)
        return build_engine_record(self.config, live.facts, instance=live.instance,
                                   started_at=live.instance_seen_at, lease_id=lease_id, status=status,
                                   registered_at=previous.registered_at if previous is not None else None)

    def build_record(self) -> EngineRecord | None:
        """The record this agent would write now (None while unregistered)."""
        registration = self.registration
        session = registration.session if registration is not None else None
        return self._build_record(session.lease_id, registration.record) if session is not None else None

    def _mark_dirty(self) -> None:
        if self.registration is not None:
            self.registration.mark_dirty()

    def _record_written(self, record: EngineRecord) -> None:
        if self.links is not None:
            self.links.wake_all()

    def _wake_link(self, prefill_id: str) -> None:
        if self.links is not None:
            self.links.wake(prefill_id)

    async def _new_incarnation(self, record: EngineRecord | None) -> None:
        """A new lease (see Registration._new_lease): our link records name the new incarnation at once
        (the links themselves hold: the engines did not change), and the load record is put again."""
        if record is not None and self.links is not None:
            await self.links.rewrite_records(record)
        if self.load is not None:
            self.load.reset()

    async def _etcd_back(self, replaced: bool) -> None:
        """etcd answers again after an outage (the lease session says so): the decode side lists engines/
        again at once instead of waiting for its watch to come back."""
        if self.config.role == "decode" and self.watch is not None:
            try:
                await asyncio.wait_for(self.watch.resync(), ETCD_BACK_RELIST_TIMEOUT)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - the watch catches up by itself
                log.info("agent %s: re-listing engines after the outage failed: %s", self.config.id, exc)

    async def _put_load(self, record: LoadRecord) -> None:
        if self.registration is None:
            raise RuntimeError("not registered")
        await self.registration.put(self.keys.load(self.config.id), record.encode())

    def _num_gpu_blocks(self) -> int | None:
        live = self.liveness
        return live.facts.config.num_gpu_blocks if live is not None and live.facts is not None else None


async def _bounded(awaitable, timeout: float, what: str):
    """Await a shutdown step, but never let one step hang the stop (logged, then skipped)."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        log.warning("agent stop: %s took longer than %.0fs; skipped", what, timeout)
    except Exception as exc:  # noqa: BLE001 - shutdown goes on
        log.warning("agent stop: %s failed: %s", what, exc)
    return None
