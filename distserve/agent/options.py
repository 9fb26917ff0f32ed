"""Command-line options of the agent, shared by `distserve agent` (sidecar) and `distserve engine --etcd`
(the same agent inside the engine's process), and the one place the agent reads the environment: the
shared DISTSERVE_CLUSTER and DISTSERVE_CLUSTER_TOKEN (distserve.cluster.settings) and the etcd client's
DISTSERVE_ETCD_* (discovery.config). Every variable is documented once, in docs/configuration.md."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from discovery.config import EtcdConfig
from distserve.agent.config import AgentConfig
from distserve.cluster.settings import ENV_CLUSTER, ENV_CLUSTER_TOKEN, cluster_name, cluster_token


def add_agent_arguments(parser: argparse.ArgumentParser, *, standalone: bool) -> None:
    """The agent's options. `standalone`: also --engine-url and --role (the sidecar); inside the engine
    these come from the engine's own options. The etcd options (--etcd ...) are added too."""
    group = parser.add_argument_group("agent", "registration in etcd (docs/agent.md)" if standalone else
                                      "registration in etcd: given --etcd, the engine runs its agent in-process")
    if standalone:
        group.add_argument("--engine-url", required=True, metavar="URL",
                           help="how the agent reaches its engine, e.g. http://127.0.0.1:23333")
        group.add_argument("--role", required=True, choices=["prefill", "decode", "hybrid"], type=str.lower,
                           help="the engine's role")
    group.add_argument("--cluster", default=None, metavar="NAME",
                       help=f"cluster name in the key schema (env {ENV_CLUSTER}; default 'default')")
    group.add_argument("--engine-id", default=None, metavar="ID",
                       help="engine id in etcd (default: from the advertised host and port)")
    group.add_argument("--advertise-url", default=None, metavar="URL",
                       help="URL peers and routers use (default: the engine URL; a 0.0.0.0 host is replaced "
                            "by this host's address)")
    group.add_argument("--ttl", type=int, default=5, metavar="SECONDS", help="lease TTL (default 5)")
    group.add_argument("--cluster-token", default=None, metavar="TOKEN",
                       help=f"Bearer key sent to engines (env {ENV_CLUSTER_TOKEN}; prefer the env var)")
    group.add_argument("--transfer-protocol", dest="transfer_protocol", default=None,
                       choices=["tcp", "rdma", "nvlink"],
                       help="KV transfer protocol recorded for peers (default: what the engine reports, "
                            "else tcp for the reference engine and rdma for lmdeploy)")
    group.add_argument("--rdma-link-type", default="RoCE", choices=["IB", "RoCE"], help="RDMA link type (default RoCE)")
    group.add_argument("--rdma-devices", default="", metavar="DEV[,DEV]",
                       help="RDMA NICs per TP rank, recorded for peers (e.g. mlx5_0,mlx5_1)")
    group.add_argument("--handshake-concurrency", type=int, default=8, metavar="N",
                       help="most link handshakes in flight at once (decode agents; default 8)")
    group.add_argument("--link-hold", type=float, default=None, metavar="SECONDS",
                       help="decode agents: keep a link this long after its prefill's record vanished, so a "
                            "prefill that only lost its lease keeps its link without a new handshake "
                            "(default: the lease TTL)")
    group.add_argument("--keep-on-exit", action="store_true",
                       help="on a graceful stop leave the lease to expire instead of revoking it, so an agent "
                            "restarted within the TTL adopts the links without handshaking")
    if standalone:
        group.add_argument("--software-version", default=None, metavar="TEXT",
                           help="engine software version to record when the engine does not report one "
                                "(lmdeploy has no version route), e.g. 'lmdeploy 0.18.0'")
        group.add_argument("--log-level", default="INFO", type=str.upper,
                           choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    if not any(action.dest == "etcd_endpoints" for action in parser._actions):
        EtcdConfig.add_arguments(parser)


def agent_config_from_args(args: argparse.Namespace, *, engine_url: str | None = None,
                           role: str | None = None) -> AgentConfig:
    """Raises ValueError with a one-line message on bad input."""
    token = cluster_token(args.cluster_token)
    values = dict(
        engine_url=engine_url or args.engine_url,
        role=(role or args.role).lower(),
        cluster=cluster_name(args.cluster),
        engine_id=args.engine_id,
        advertise_url=args.advertise_url,
        ttl=args.ttl,
        cluster_token=token,
        protocol=args.transfer_protocol,
        rdma_link_type=args.rdma_link_type,
        rdma_devices=[d.strip() for d in (args.rdma_devices or "").split(",") if d.strip()],
        handshake_concurrency=args.handshake_concurrency,
        link_hold=args.link_hold,
        keep_on_exit=args.keep_on_exit,
        software_version=getattr(args, "software_version", None),
    )
    try:
        return AgentConfig(**values)
    except ValidationError as exc:
        raise ValueError(validation_line(exc, "invalid agent configuration")) from None


def etcd_config_from_args(args: argparse.Namespace) -> EtcdConfig:
    try:
        return EtcdConfig.from_args(args)
    except ValidationError as exc:
        raise ValueError(validation_line(exc, "invalid etcd configuration")) from None


def validation_line(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).replace("Value error, ", "")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{prefix}: " + "; ".join(parts)
