"""`distserve router`: run one stateless router replica (any number can run side by side)."""

from __future__ import annotations

import argparse
import logging
import sys

from discovery.config import EtcdConfig
from distserve.router.replica import run_router
from distserve.router.settings import (
    BODY_READ_TIMEOUT_MAX,
    DRAIN_DELAY_MAX,
    ENV_API_KEYS,
    ENV_CLUSTER,
    ENV_CLUSTER_TOKEN,
    HEADER_READ_TIMEOUT_MAX,
    RouterSettings,
    env_api_keys,
    env_cluster,
    env_cluster_token,
    env_log_level,
    env_pure_python,
)
from distserve.router.strategies import STRATEGIES
from distserve.router.workers import WORKERS_MAX, Supervisor



def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RouterSettings()
    parser.add_argument("--host", default=d.host, help="interface to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on; 0 picks a free one")
    EtcdConfig.add_arguments(parser)
    parser.add_argument(
        "--cluster",
        default=env_cluster(),
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
        "--drain-delay",
        type=float,
        default=d.drain_delay,
        help="on SIGTERM: seconds during which the router is not ready and out of etcd but still serves new "
        "requests, so load balancers polling /health/ready move clients first (0-"
        f"{DRAIN_DELAY_MAX:g}; default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="router processes on this one port (SO_REUSEPORT), each a full replica with its own record "
        "(ids suffixed -w0, -w1, ...), restarted with back-off if one exits; use up to one per core "
        f"(1-{WORKERS_MAX}; default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=env_log_level(),
        help="DEBUG, INFO (one line per request), WARNING, ERROR",
    )


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    """The settings the options (and their environment defaults) give; ValueError names a bad option."""
    return RouterSettings.checked(
        host=args.host,
        port=args.port,
        cluster=args.cluster,
        router_id=args.router_id,
        advertise_url=args.advertise_url,
        strategy=args.strategy,
        api_keys=list(args.api_keys or []) or env_api_keys(),
        cluster_token=args.cluster_token or env_cluster_token(),
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
        drain_delay=args.drain_delay,
    )


def main(args: argparse.Namespace) -> int:
    try:
        logging.basicConfig(
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        settings = settings_from_args(args)
        env_pure_python()  # read again by distserve.router.heads, which cannot refuse it: refused here
        etcd_config = EtcdConfig.from_args(args)
        if not 1 <= args.workers <= WORKERS_MAX:
            raise ValueError(f"--workers must be in 1-{WORKERS_MAX}")
    except ValueError as exc:
        print(f"distserve router: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.workers > 1:
        try:
            return Supervisor(settings, etcd_config, args.workers, args.log_level).run()
        except OSError as exc:  # the port: in use, or the host cannot be bound
            print(f"distserve router: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
    return run_router(settings, etcd_config)
