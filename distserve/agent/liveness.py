"""Liveness: what the agent knows of its engine process (facts, identity, health), kept true by probing it.

Waits until the engine answers /health, /distserve/engine_info and /v1/models, then probes it every
probe_interval: unhealthy after `unhealthy_after` without an answer; a new engine process (a new instance
id, changed engine facts, or an outage with nothing listening when the engine exposes no identity) is a
new instance, hence a new incarnation. Every change calls `on_change` (the record is rewritten).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from discovery.backoff import Backoff
from distserve.agent.config import AgentConfig, AgentConfigError
from distserve.agent.engine_client import EngineClient, EngineError, EngineFacts, instance_from

log = logging.getLogger("distserve.agent")


class EngineLiveness:
    """One engine's facts, process identity and health."""

    def __init__(self, config: AgentConfig, engine: EngineClient, on_change: Callable[[], None]) -> None:
        self.config = config
        self.engine = engine
        self._on_change = on_change
        self.facts: EngineFacts | None = None
        self.instance: str | None = None
        self.instance_seen_at: float = 0.0
        self.healthy = True
        self.health_reason: str | None = None
        self._last_ok = 0.0
        self._refused_since_ok = False

    async def wait_ready(self) -> EngineFacts:
        """Until the engine answers with facts the agent can represent (AgentConfigError if it never can)."""
        config = self.config
        # Polling a starting engine: quick at first, then every probe_interval.
        backoff = Backoff(base=min(0.2, config.probe_interval), cap=config.probe_interval)
        last_logged = 0.0
        while True:
            try:
                await self.engine.health(timeout=config.probe_timeout)
                facts = await self.engine.facts(timeout=config.http_timeout)
                self._last_ok = time.monotonic()
                log.info("engine %s answers: models %s, %s", config.engine_url, facts.models,
                         facts.config.model_dump(exclude_none=True))
                break
            except EngineError as exc:
                if exc.status in (401, 403):
                    raise AgentConfigError(
                        f"engine {config.engine_url} refused the agent (HTTP {exc.status}): give the agent one "
                        f"of the engine's API keys (--cluster-token or DISTSERVE_CLUSTER_TOKEN)") from None
                if time.monotonic() - last_logged > 10:
                    log.info("waiting for engine %s: %s", config.engine_url, exc)
                    last_logged = time.monotonic()
            await asyncio.sleep(backoff.next_delay())
        self._check(facts)
        self._new_instance(facts)
        self.facts = facts
        return facts

    def _check(self, facts: EngineFacts) -> None:
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

    async def run(self) -> None:
        """Probe every probe_interval, forever (an owned task of the agent)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.probe_once()
            await asyncio.sleep(max(0.0, self.config.probe_interval - (loop.time() - started)))

    async def probe_once(self) -> None:
        config = self.config
        try:
            await self.engine.health(timeout=config.probe_timeout)
            engine_config, extras = await self.engine.engine_info(timeout=config.probe_timeout)
        except EngineError as exc:
            if exc.refused:
                self._refused_since_ok = True
            if self.healthy and time.monotonic() - self._last_ok >= config.unhealthy_after:
                self.healthy = False
                self.health_reason = str(exc)
                log.warning("engine %s unhealthy: %s", config.id, exc)
                self._on_change()
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
                    metrics = await self.engine.metrics(timeout=config.probe_timeout)
            reported = instance_from(extras, metrics)
            if reported is not None:
                restarted = reported != self.instance
            elif was_down:
                restarted = True  # no identity exposed (lmdeploy without metrics): an outage means a new process
            if engine_config.model_dump() != facts.config.model_dump():
                restarted = True
        if restarted:
            try:
                fresh = await self.engine.facts(timeout=config.http_timeout)
            except EngineError as exc:
                log.info("engine %s answered but its facts did not: %s", config.id, exc)
                return
            if fresh.instance_id is None or fresh.instance_id != self.instance:
                previous = self.instance
                self.facts = fresh
                self._new_instance(fresh)
                log.warning("engine %s restarted (instance %s -> %s): new incarnation", config.id, previous,
                            self.instance)
                self._on_change()
        self._refused_since_ok = False
        if not self.healthy:
            self.healthy = True
            self.health_reason = None
            log.info("engine %s healthy again (after %.1fs)", config.id, down_for)
            self._on_change()
