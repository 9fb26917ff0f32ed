"""`distserve agent`: the etcd agent as a sidecar of an engine (a stock lmdeploy api_server, or a reference
engine started without --etcd).

    distserve agent --engine-url http://127.0.0.1:23333 --role prefill --etcd http://10.0.0.5:2379

Runs until SIGTERM/SIGINT, then revokes its lease (the engine's records vanish at once) and exits 0.
Bad options: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from distserve.agent.config import AgentConfigError
from distserve.agent.options import add_agent_arguments, agent_config_from_args, etcd_config_from_args

if TYPE_CHECKING:
    from distserve.agent.agent import Agent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_agent_arguments(parser, standalone=True)


def main(args: argparse.Namespace) -> int:
    try:
        config = agent_config_from_args(args)
        etcd = etcd_config_from_args(args)
    except ValueError as exc:
        print(f"distserve agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from distserve.agent.agent import Agent  # the etcd client (grpc) and aiohttp load only when running

    try:
        return asyncio.run(run_agent(Agent(config, etcd)))
    except AgentConfigError as exc:
        print(f"distserve agent: {exc}", file=sys.stderr)
        return 2


async def run_agent(agent: "Agent") -> int:
    """Run until a stop signal (graceful stop) or a configuration error (raised)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    stopper = asyncio.create_task(stop.wait())
    runner = asyncio.create_task(agent.run())
    try:
        await asyncio.wait({stopper, runner}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        await agent.stop()
    if runner.done() and not runner.cancelled() and runner.exception() is not None:
        raise runner.exception()
    return 0
