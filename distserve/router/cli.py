"""`distserve router`: run one stateless router replica (any number can run side by side)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from distserve.router.settings import BODY_READ_TIMEOUT_MAX, HEADER_READ_TIMEOUT_MAX, RouterSettings
from distserve.router.strategies import STRATEGIES

ENV_CLUSTER = "DISTSERVE_CLUSTER"
ENV_CLUSTER_TOKEN = "DISTSERVE_CLUSTER_TOKEN"
ENV_API_KEYS = "DISTSERVE_API_KEYS"

log = logging.getLogger("distserve.router")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from discovery.config import EtcdConfig

    d = RouterSettings()
    parser.add_argument("--host", default=d.host, help="interface to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on; 0 picks a free one")
    EtcdConfig.add_arguments(parser)
    parser.add_argument(
        "--cluster",
        default=os.environ.get(ENV_CLUSTER) or d.cluster,
        help=f"cluster name in the etcd key schema (env {ENV_CLUSTER}; default %(default)s)",
    )
    parser.add_argument(
        "--strategy",
        default=d.strategy,
        choices=sorted(STRATEGIES),
        help="routing strategy until etcd's config/routing sets one (default %(default)s)",
    )
    parser.add_argument(
        "--api-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help=f"client API keys (Bearer); also ${ENV_API_KEYS} (comma-separated); none = open",
    )
    parser.add_argument(
        "--cluster-token",
        default=None,
        help=f"token sent to engines as a Bearer key (or ${ENV_CLUSTER_TOKEN})",
    )
    parser.add_argument("--router-id", default=None, help="id under routers/ (default <hostname>-<port>)")
    parser.add_argument(
        "--advertise-url", default=None, help="URL recorded in etcd (default http://host:port)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        help="client bodies above this get 413 (default %(default)s)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=d.max_in_flight,
        help="requests in flight above which new ones get 429 (0 = unbounded)",
    )
    g = parser.add_argument_group("timeouts (seconds)")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    g.add_argument("--prefill-timeout", type=float, default=d.prefill_timeout)
    g.add_argument("--decode-first-byte-timeout", type=float, default=d.decode_first_byte_timeout)
    g.add_argument("--decode-idle-timeout", type=float, default=d.decode_idle_timeout)
    g.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="bound on a whole non-streamed request",
    )
    g.add_argument("--free-cache-timeout", type=float, default=d.free_cache_timeout)
    g.add_argument(
        "--header-read-timeout",
        type=float,
        default=d.header_read_timeout,
        help="a client must send a request's headers within this (from its first byte); else 408 and the "
        f"connection is closed (at most {HEADER_READ_TIMEOUT_MAX:g}; default %(default)s)",
    )
    g.add_argument(
        "--body-read-timeout",
        type=float,
        default=d.body_read_timeout,
        help="a client must send a request's body within this (from the end of its headers); else 408 and "
        f"the connection is closed (at most {BODY_READ_TIMEOUT_MAX:g}; default %(default)s)",
    )
    r = parser.add_argument_group("retries and breakers")
    r.add_argument(
        "--max-prefill-attempts",
        type=int,
        default=d.max_prefill_attempts,
        help="entry engines (prefill or hybrid) tried per request (default %(default)s)",
    )
    r.add_argument(
        "--max-decode-attempts",
        type=int,
        default=d.max_decode_attempts,
        help="decode engines tried per request before the first byte (default %(default)s)",
    )
    r.add_argument("--breaker-probe-interval", type=float, default=d.breaker_probe_interval)
    r.add_argument(
        "--route-wait",
        type=float,
        default=d.route_wait,
        help="seconds a request waits for a routable engine before its 503, e.g. while engines re-register "
        "after etcd lost their leases (0 = at once; default %(default)s)",
    )
    parser.add_argument("--lease-ttl", type=float, default=d.lease_ttl, help="TTL of the router's own lease")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO (one line per request), WARNING, ERROR",
    )


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    api_keys = list(args.api_keys or [])
    if not api_keys and os.environ.get(ENV_API_KEYS):
        api_keys = [k.strip() for k in os.environ[ENV_API_KEYS].split(",") if k.strip()]
    s = RouterSettings(
        host=args.host,
        port=args.port,
        cluster=args.cluster,
        router_id=args.router_id,
        advertise_url=args.advertise_url,
        strategy=args.strategy,
        api_keys=api_keys,
        cluster_token=args.cluster_token or os.environ.get(ENV_CLUSTER_TOKEN) or None,
        max_body_bytes=args.max_body_bytes,
        max_in_flight=args.max_in_flight,
        connect_timeout=args.connect_timeout,
        prefill_timeout=args.prefill_timeout,
        decode_first_byte_timeout=args.decode_first_byte_timeout,
        decode_idle_timeout=args.decode_idle_timeout,
        request_timeout=args.request_timeout,
        header_read_timeout=args.header_read_timeout,
        body_read_timeout=args.body_read_timeout,
        free_cache_timeout=args.free_cache_timeout,
        max_prefill_attempts=args.max_prefill_attempts,
        max_decode_attempts=args.max_decode_attempts,
        breaker_probe_interval=args.breaker_probe_interval,
        route_wait=args.route_wait,
        lease_ttl=args.lease_ttl,
    )
    for name in (
        "connect_timeout",
        "prefill_timeout",
        "decode_first_byte_timeout",
        "decode_idle_timeout",
        "request_timeout",
        "free_cache_timeout",
        "lease_ttl",
        "breaker_probe_interval",
    ):
        if getattr(s, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if s.max_prefill_attempts < 1 or s.max_decode_attempts < 1:
        raise ValueError("--max-prefill-attempts and --max-decode-attempts must be >= 1")
    if not 0 < s.header_read_timeout <= HEADER_READ_TIMEOUT_MAX:
        raise ValueError(f"--header-read-timeout must be in (0, {HEADER_READ_TIMEOUT_MAX:g}] seconds")
    if not 0 < s.body_read_timeout <= BODY_READ_TIMEOUT_MAX:
        raise ValueError(f"--body-read-timeout must be in (0, {BODY_READ_TIMEOUT_MAX:g}] seconds")
    if not 0 <= s.route_wait <= 600:
        raise ValueError("--route-wait must be in 0-600 seconds")
    if s.max_body_bytes < 1024:
        raise ValueError("--max-body-bytes must be >= 1024")
    if not 0 <= s.max_in_flight <= 1_000_000:
        raise ValueError("--max-in-flight must be in 0-1000000 (0 = unbounded)")
    if not 0 <= s.port < 65536:
        raise ValueError("--port must be in 0-65535")
    return s


async def serve(settings: RouterSettings, etcd_config) -> int:
    from discovery.client import EtcdClient
    from distserve.router.app import Router

    client = EtcdClient(etcd_config)
    await client.connect()
    router = Router(settings, client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.start()
        # Everything allocated so far (modules, records, the app) lives as long as the process: keep it out
        # of the collector's scans, and collect the young generation less often. A full collection over it
        # takes milliseconds, and it would land on whichever request happens to allocate at that moment.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 50, 100)
        print(
            f"distserve router {router.router_id} listening on {router.url} "
            f"(cluster {settings.cluster}, strategy {router.strategy_name})",
            flush=True,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        await router.stop()
        await client.close()
    return 0


def main(args: argparse.Namespace) -> int:
    from discovery.client import EtcdError
    from discovery.config import EtcdConfig

    try:
        logging.basicConfig(
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        settings = settings_from_args(args)
        etcd_config = EtcdConfig.from_args(args)
    except ValueError as exc:
        print(f"distserve router: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        run = asyncio.run
    try:
        return run(serve(settings, etcd_config))
    except (EtcdError, OSError) as exc:
        print(f"distserve router: {exc}", file=sys.stderr)
        return 1
