"""A stand-in for a stock `lmdeploy serve api_server --backend pytorch --role Prefill|Decode`, named as such:
lmdeploy needs CUDA and cannot run on this machine. It serves only what an agent touches, shaped like
lmdeploy 0.18 (../shared/notes/engine-protocol.md):

- GET /health, GET /v1/models;
- GET /distserve/engine_info: a JSON *string* with lmdeploy's fields only (no instance_id, no kv_layout,
  no role: lmdeploy has none of these);
- POST /distserve/p2p_initialize, p2p_connect, p2p_drop_connect with integer enums and `cache_pools`;
- GET /metrics only with --enable-metrics: the `lmdeploy:*` scheduler gauges and, unless
  --no-process-metrics, prometheus_client's `process_start_time_seconds`.
- GET /_fake/stats (test-only): how many handshake calls it served.
- fault options (test-only): --fail-initialize N (the first N p2p_initialize answer 500), --pool-layers L
  (a KV pool shape that differs from a peer's).

    python -m tests.agent.fake_lmdeploy --port 23333 --role prefill [--enable-metrics]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

from aiohttp import web
from pydantic import ValidationError

from distserve.protocol import ConnectRequest, DropConnectRequest, InitRequest

MODEL = "internlm/internlm2_5-7b-chat"


def build_app(args: argparse.Namespace) -> web.Application:
    stats = {"p2p_initialize": 0, "p2p_connect": 0, "p2p_drop_connect": 0}
    started = time.time()
    peers: set[str] = set()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": int(time.time()), "owned_by": "lmdeploy", "root": MODEL}]})

    async def engine_info(request: web.Request) -> web.Response:
        info = {"tp_size": 1, "ep_size": 1, "dp_size": 1, "pp_size": None, "dp_rank": 0, "block_size": 64,
                "num_cpu_blocks": 0, "num_gpu_blocks": args.num_gpu_blocks}
        return web.json_response(json.dumps(info))

    async def parse(request: web.Request, model):
        try:
            return model.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    async def p2p_initialize(request: web.Request) -> web.Response:
        raw = await request.json()
        for side in ("local_engine_config", "remote_engine_config"):
            # lmdeploy's DistServeEngineConfig declares pp_size Optional without a default: it is required.
            if not isinstance(raw.get(side), dict) or "pp_size" not in raw[side]:
                raise web.HTTPBadRequest(text=f"{side}.pp_size: Field required")
        req = await parse(request, InitRequest)
        stats["p2p_initialize"] += 1
        if stats["p2p_initialize"] <= args.fail_initialize:  # a transient failure (lmdeploy answers 500s)
            return web.json_response({"error": "Internal Server Error"}, status=500)
        endpoint = json.dumps({"qp_num": [1234], "gid": "fe80::1", "lid": 0, "mr_info": {}})
        return web.json_response({
            "status": 1, "engine_endpoint_info": {"zmq_address": f"tcp://127.0.0.1:{args.port + 1000}"},
            "kvtransfer_endpoint_info": [{"protocol": int(req.protocol), "endpoint_info": endpoint,
                                          "cache_pools": [{"shape": [args.pool_layers, args.num_gpu_blocks, 2, 64, 8, 128],
                                                           "dtype": "bfloat16", "element_size": 2,
                                                           "entry_axis": 1}]}]})

    async def p2p_connect(request: web.Request) -> web.Response:
        req = await parse(request, ConnectRequest)
        stats["p2p_connect"] += 1
        peers.add(req.remote_engine_id)
        return web.json_response({"status": 1})

    async def p2p_drop_connect(request: web.Request) -> web.Response:
        req = await parse(request, DropConnectRequest)
        stats["p2p_drop_connect"] += 1
        peers.discard(req.remote_engine_id)
        return web.json_response({"success": True})

    async def metrics(request: web.Request) -> web.Response:
        labels = f'model_name="{MODEL}",engine="0"'
        lines = [
            "# TYPE lmdeploy:num_requests_running gauge", f"lmdeploy:num_requests_running{{{labels}}} {args.running}.0",
            "# TYPE lmdeploy:num_requests_waiting gauge", f"lmdeploy:num_requests_waiting{{{labels}}} {args.waiting}.0",
            "# TYPE lmdeploy:gpu_cache_usage_perc gauge", f"lmdeploy:gpu_cache_usage_perc{{{labels}}} {args.usage}",
        ]
        if not args.no_process_metrics:
            lines += ["# TYPE process_start_time_seconds gauge", f"process_start_time_seconds {started:.2f}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def fake_stats(request: web.Request) -> web.Response:
        return web.json_response({**stats, "peers": sorted(peers), "pid": os.getpid()})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/distserve/engine_info", engine_info)
    app.router.add_post("/distserve/p2p_initialize", p2p_initialize)
    app.router.add_post("/distserve/p2p_connect", p2p_connect)
    app.router.add_post("/distserve/p2p_drop_connect", p2p_drop_connect)
    if args.enable_metrics:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/_fake/stats", fake_stats)
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(args), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"fake lmdeploy api_server on {args.port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role", choices=["prefill", "decode", "hybrid"], required=True)
    parser.add_argument("--enable-metrics", action="store_true")
    parser.add_argument("--no-process-metrics", action="store_true")
    parser.add_argument("--num-gpu-blocks", type=int, default=1000)
    parser.add_argument("--running", type=int, default=0)
    parser.add_argument("--waiting", type=int, default=0)
    parser.add_argument("--usage", type=float, default=0.0)
    parser.add_argument("--fail-initialize", type=int, default=0, help="answer the first N p2p_initialize with 500")
    parser.add_argument("--pool-layers", type=int, default=32, help="layers in the advertised KV pool shape")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
