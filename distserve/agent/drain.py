"""Drain: while the operator's drain flag is set, wait until the engine's in-flight work reaches zero and
stays there for `drain_quiet` (or, for an engine without load figures, `drain_unknown_grace`), then end
the registration (docs/agent.md, "Operator flags")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from distserve.agent.config import AgentConfig
from distserve.agent.load import LoadPublisher
from distserve.agent.watches import ClusterWatch


async def drain_when_flagged(config: AgentConfig, watch: ClusterWatch, load: Callable[[], LoadPublisher | None],
                             deregister: Callable[[str], Awaitable[None]]) -> None:
    """One registration epoch's drain monitor (an owned task): returns after calling `deregister`."""
    zero_since: float | None = None
    drain_since: float | None = None
    while True:
        if not watch.flags.drain:
            zero_since = drain_since = None
            await watch.wait_flags(lambda flags: flags.drain)
            continue
        now = time.monotonic()
        drain_since = drain_since or now
        publisher = load()
        if publisher is not None and publisher.known and publisher.latest is not None:
            idle = publisher.latest.in_flight == 0 and not (publisher.latest.preserved_blocks or 0)
            zero_since = (zero_since or now) if idle else None
            done = zero_since is not None and now - zero_since >= config.drain_quiet
        else:
            done = now - drain_since >= config.drain_unknown_grace
        if done:
            await deregister("drained: no work in flight")
            return
        await asyncio.sleep(min(0.25, config.load_interval))
