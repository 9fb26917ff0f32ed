"""The agent inside the reference engine's process: `distserve engine ... --etcd ENDPOINTS [agent options]`.

The engine CLI calls `add_arguments(parser)` while building its parser and `start_agents(args, engines)`
once every engine listens; the returned cleanups run on shutdown before the engines stop, so the lease is
revoked (routers stop sending) while the engine still answers. Without --etcd nothing starts.
With `--count N` (null mode) each engine gets its own agent (own lease, own etcd client); the decode agents
of one process share one handshake semaphore, so the process as a whole stays within the bound.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from distserve import __version__
from distserve.agent.config import advertise_from
from distserve.agent.links import HandshakeLimiter
from distserve.agent.options import add_agent_arguments, agent_config_from_args, etcd_config_from_args

log = logging.getLogger("distserve.agent")


class EmbeddedAgentError(Exception):
    """Bad agent options given to `distserve engine` (one line)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_agent_arguments(parser, standalone=False)


async def start_agents(args: argparse.Namespace, engines: list[tuple[str, str, int]], *,
                       api_keys: list[str] | None = None) -> list[Callable[[], Awaitable[None]]]:
    """engines: (url the agent uses, bind host, port) per served engine. Returns one cleanup per agent."""
    if not getattr(args, "etcd_endpoints", None):
        return []
    # Here, not at the top: the etcd client (grpc) loads only when an agent runs (`distserve engine`
    # without --etcd builds its parser from this module and never needs it).
    from distserve.agent.agent import Agent

    if args.cluster_token is None and api_keys:
        args.cluster_token = api_keys[0]  # the engines of one cluster share the key the agents present
    try:
        if args.advertise_url and len(engines) > 1:
            raise ValueError("--advertise-url names one engine; with --count N each engine advertises its own URL")
        etcd = etcd_config_from_args(args)
        configs = []
        for index, (url, host, port) in enumerate(engines):
            advertise = args.advertise_url if len(engines) == 1 else None
            if advertise is None and host in ("0.0.0.0", "::", ""):
                advertise = advertise_from(f"{urlsplit(url).scheme}://0.0.0.0:{port}")
            engine_id = args.engine_id
            if engine_id and len(engines) > 1:
                engine_id = f"{engine_id}-{index}"
            config = agent_config_from_args(args, engine_url=url, role=args.role)
            configs.append(config.model_copy(update={"advertise_url": advertise or config.advertise_url,
                                                     "engine_id": engine_id,
                                                     "software_version": f"distserve-reference {__version__}"}))
    except ValueError as exc:
        raise EmbeddedAgentError(str(exc)) from None
    semaphore = HandshakeLimiter(configs[0].handshake_concurrency) if configs else None
    agents = [Agent(config, etcd, handshake_semaphore=semaphore) for config in configs]
    for agent in agents:
        await agent.start()
    return [agent.stop for agent in agents]
