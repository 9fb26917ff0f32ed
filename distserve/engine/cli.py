"""`distserve engine`: the CPU reference engine (or, with --null, a torch-free stand-in).

Importing this module imports neither torch nor dlslime; only the real model path does, at start.
Every DISTSERVE_* variable the engine reads is read in distserve.migration.settings (checked at start-up)
or, for the shared cluster token, distserve.cluster.settings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from distserve.agent.embed import EmbeddedAgentError, start_agents
from distserve.agent.embed import add_arguments as add_agent_arguments
from distserve.cluster.settings import cluster_token
from distserve.engine.config import ModelConfig
from distserve.engine.core import Engine, EngineSettings, NullExecutor
from distserve.engine.hf import CheckpointError
from distserve.engine.server import create_app
from distserve.engine.tokenizer import HFTokenizer
from distserve.migration import settings as engine_env
from distserve.migration import transport
from distserve.migration.errors import TransportUnavailable
from distserve.protocol import PROTOCOL_BY_NAME, EngineRole

log = logging.getLogger("distserve.engine")
LISTEN_BACKLOG = 2048

ROLES = {"hybrid": EngineRole.Hybrid, "prefill": EngineRole.Prefill, "decode": EngineRole.Decode}


@dataclass
class ServedEngine:
    """One engine listening on one port (several in one process with --null --count N)."""

    engine: "object"  # distserve.engine.core.Engine
    url: str
    host: str
    port: int
    runner: web.AppRunner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=sorted(ROLES), default="hybrid", help="engine role (default hybrid)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=23333, help="HTTP port (0: any free port; with --count, the "
                        "first of N consecutive ports)")
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory (config.json, "
                        "*.safetensors, tokenizer files) of the dense Llama family: Llama, Qwen2, Mistral "
                        "(default: the built-in random model)")
    parser.add_argument("--model-config", metavar="FILE", help="model and KV-cache configuration (JSON, see "
                        "docs/reference-engine.md); with --model only its cache and serving fields")
    parser.add_argument("--model-name", help="served model name (default: the config's name; with --model, the "
                        "directory's name)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights, activations and KV pool "
                        "(default float32)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the config's; with --model, "
                        "its max_position_embeddings)")
    parser.add_argument("--weights", metavar="FILE", help="safetensors weights (default: random from --seed)")
    parser.add_argument("--seed", type=int, help="weight seed (overrides the config)")
    parser.add_argument("--num-blocks", type=int, help="KV blocks in the pool (overrides the config)")
    parser.add_argument("--block-size", type=int, help="tokens per KV block (overrides the config)")
    parser.add_argument("--null", action="store_true", help="null mode: no model, instant deterministic answers, "
                        "real handshakes and KV bookkeeping without moving data (no torch, no dlslime)")
    parser.add_argument("--count", type=int, default=1, help="serve N engines in this process (null mode only)")
    parser.add_argument("--api-keys", nargs="+", metavar="KEY", default=None,
                        help="accepted Bearer keys; every route but /health then needs one "
                             "(env DISTSERVE_ENGINE_API_KEYS, comma separated)")
    parser.add_argument("--peer-token", default=None, help="Bearer key for calls to other engines (free_cache); "
                        "default: env DISTSERVE_CLUSTER_TOKEN")
    parser.add_argument("--migration-protocol", choices=sorted(PROTOCOL_BY_NAME), default="tcp",
                        help="KV transport (tcp here; rdma and nvlink need the hardware)")
    parser.add_argument("--transfer-host", default=None, help="interface the transfer endpoints bind to and "
                        "advertise (default: --host, or 127.0.0.1 when --host is 0.0.0.0)")
    parser.add_argument("--preserve-ttl", type=float, default=60.0, help="seconds a prefill keeps KV no decode "
                        "claimed (default 60)")
    parser.add_argument("--migration-deadline", type=float, default=30.0, help="seconds before a KV pull fails "
                        "(default 30)")
    parser.add_argument("--kv-staging-blocks", type=int, default=None, metavar="N",
                        help="staging arena, in KV blocks: scattered blocks migrate as one packed range "
                        "(default: a quarter of the pool; 0 = off, every pull reads blocks directly)")
    parser.add_argument("--kv-allocation", choices=["first-fit", "scattered"], default="first-fit",
                        help="block allocation: first-fit (contiguous runs when free, the default) or scattered "
                        "(random ids: a worst-case fragmented pool, for tests and benchmarks)")
    parser.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                        help="automatic prefix caching: full KV blocks of finished requests stay cached (LRU) "
                        "and a request reuses its longest cached prefix (default on)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 for the "
                        "built-in model, one per physical core with --model)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096, help="prompt tokens per prefill step")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    _add_agent_arguments(parser)


# ---- In-process agent hook (the agent component's spot) ------------------------------------------------
# `distserve engine --etcd ...` will start an agent next to each engine. Its flags go in
# `_add_agent_arguments`; `_start_sidecars` runs once every engine listens (and /health answers 200) and
# returns async cleanups, awaited on shutdown before the engines stop (so an agent can deregister first).
def _add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    add_agent_arguments(parser)


async def _start_sidecars(args: argparse.Namespace,
                          served: list[ServedEngine]) -> list[Callable[[], Awaitable[None]]]:
    try:
        return await start_agents(args, [(s.url, s.host, s.port) for s in served], api_keys=_api_keys(args))
    except EmbeddedAgentError as exc:
        raise ConfigError(str(exc)) from None
# --------------------------------------------------------------------------------------------------------


class ConfigError(Exception):
    pass


def _settings(args: argparse.Namespace, model) -> EngineSettings:
    host = args.host
    transfer_host = args.transfer_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
    if transfer_host in ("0.0.0.0", "::"):
        raise ConfigError("--transfer-host must be a concrete private interface, never 0.0.0.0")
    if args.kv_staging_blocks is not None and not 0 <= args.kv_staging_blocks <= 1 << 22:
        raise ConfigError("--kv-staging-blocks must be in 0-4194304")
    return EngineSettings(
        role=ROLES[args.role],
        model_name=args.model_name or model.name,
        protocol=PROTOCOL_BY_NAME[args.migration_protocol],
        transfer_host=transfer_host,
        preserve_ttl=args.preserve_ttl,
        migration_deadline=args.migration_deadline,
        staging_blocks=args.kv_staging_blocks,
        scattered_allocation=args.kv_allocation == "scattered",
        peer_token=cluster_token(args.peer_token),
        null=args.null,
        prefix_caching=args.prefix_caching == "on",
    )


def _api_keys(args: argparse.Namespace) -> list[str] | None:
    if args.api_keys:
        return list(args.api_keys)
    try:
        return list(engine_env.engine_api_keys()) or None
    except engine_env.SettingsError as exc:
        raise ConfigError(str(exc)) from None


def _load_model_config(args: argparse.Namespace):
    if args.model is not None and (args.weights is not None or args.seed is not None):
        raise ConfigError("--weights and --seed are for the built-in model, not --model")
    try:
        return ModelConfig.load(args.model_config, {"seed": args.seed, "num_blocks": args.num_blocks,
                                                    "block_size": args.block_size, "weights": args.weights,
                                                    "dtype": args.dtype, "max_model_len": args.max_model_len},
                                hf_dir=args.model)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"bad model configuration: {' '.join(first[:3])}") from None


def _make_executor(args: argparse.Namespace, model):
    if args.null:
        return NullExecutor()
    # The only place torch is imported: --null engines and --help never load it.
    from distserve.engine.torch_backend import TorchExecutor  # noqa: PLC0415

    try:
        tok = None
        if model.hf_dir is not None:
            tok = HFTokenizer(model.hf_dir, model.vocab_size, model.eos_token_ids)
        threads = args.threads if args.threads is not None else (None if model.hf_dir else 1)
        return TorchExecutor(model, threads=threads, max_batch_size=args.max_batch_size,
                             max_prefill_tokens=args.max_prefill_tokens, tok=tok)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot load the model: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


async def _serve(args: argparse.Namespace) -> int:
    try:
        engine_env.load()  # every DISTSERVE_* variable of the engine, checked before anything starts
    except engine_env.SettingsError as exc:
        raise ConfigError(str(exc)) from None
    model = _load_model_config(args)
    keys = _api_keys(args)
    if args.count < 1 or (args.count > 1 and not args.null):
        raise ConfigError("--count N > 1 needs --null (one real engine per process)")
    if not args.null:
        try:
            transport.check_transport(PROTOCOL_BY_NAME[args.migration_protocol])
        except TransportUnavailable as exc:
            raise ConfigError(exc.message) from None
    served: list[ServedEngine] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cleanups: list[Callable[[], Awaitable[None]]] = []
    try:
        for i in range(args.count):
            engine = Engine(model, _settings(args, model), _make_executor(args, model))
            await engine.start()
            # handler_cancellation: a client that goes away cancels its handler, which aborts the
            # sequence and frees its KV (aiohttp would otherwise run a non-streamed request to the end).
            runner = web.AppRunner(create_app(engine, keys), access_log=None, handle_signals=False,
                                   handler_cancellation=True)
            await runner.setup()
            port = args.port + i if args.port else 0
            # aiohttp's default backlog (128) overflows under cold bursts from many router connections.
            site = web.TCPSite(runner, args.host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                await engine.stop()
                raise ConfigError(f"cannot listen on {args.host}:{port}: {exc.strerror or exc}") from None
            real_port = runner.addresses[0][1]
            shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
            url = f"http://{shown}:{real_port}"
            served.append(ServedEngine(engine, url, args.host, real_port, runner))
            print(f"distserve engine ready: role={args.role} kind={'null' if args.null else 'reference'} "
                  f"url={url} instance_id={engine.settings.instance_id}", flush=True)
        cleanups = await _start_sidecars(args, served)
        await stop.wait()
        log.info("shutting down")
    finally:
        for cleanup in reversed(cleanups):
            try:
                await asyncio.wait_for(cleanup(), 10)
            except Exception:  # noqa: BLE001 - shutdown goes on
                log.exception("sidecar cleanup failed")
        for item in served:
            item.engine.healthy = False
        transport.stop_waiters()
        for item in served:
            await item.runner.cleanup()
            await item.engine.stop()
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop  # noqa: PLC0415 - optional dependency

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(_serve(args))
    except ConfigError as exc:
        print(f"distserve engine: error: {exc}", file=sys.stderr)
        return 2
