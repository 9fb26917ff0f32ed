"""List-then-watch a prefix with correct resume, compaction recovery and progress checks.

etcd3aio's own watch loop resumes from `header.revision + 1`, which silently skips events when a stream
breaks during a history replay (the header then holds the current store revision, not the replay
position); and a watch on a compacted revision blocks forever. The rules here, as in etcd's Go clientv3:

- resume from the last delivered event's `mod_revision + 1`;
- after a progress notification (no events) from `header.revision + 1` (etcd only sends those to a
  watcher that has caught up);
- when the start revision was compacted: list the prefix at a revision R, emit the differences against
  the keys delivered so far (deletions included) and watch from R + 1;
- a stream that says nothing for `idle_timeout` seconds (a frozen or partitioned member) is dropped and
  re-opened on the next endpoint; we ask for progress every `progress_interval` seconds so an idle watch
  still hears from the server, and send `hasleader` so a member that lost its leader ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal

import grpc
from etcd3aio._protobuf import rpc_pb2
from etcd3aio.kv import prefix_range_end

from discovery.client import (
    EtcdAuthError,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    RevisionCompacted,
    backoff_delay,
    classify,
    raise_if_cancelling,
    read_stream,
)

log = logging.getLogger(__name__)

EventType = Literal["put", "delete", "progress", "synced"]

_PUT = 0  # mvccpb.Event.PUT
_DELETE = 1  # mvccpb.Event.DELETE


@dataclass(frozen=True)
class WatchEvent:
    """One change under the watched prefix.

    type "put"/"delete" are key changes. With `meta_events=True` the stream also carries "progress"
    (the server confirmed nothing changed up to `revision`) and "synced" (a full list at `revision` was
    just delivered: after the initial list and after a compaction re-list).
    """

    type: EventType
    key: str
    value: bytes | None
    mod_revision: int
    revision: int  # header revision of the response that carried it
    create_revision: int = 0
    version: int = 0
    lease: int = 0


class _Compacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(compact_revision)
        self.compact_revision = compact_revision


async def watch_prefix(
    client: EtcdClient,
    prefix: str,
    start_revision: int | None = None,
    *,
    known: Mapping[str, int] | None = None,
    meta_events: bool = False,
    progress_interval: float = 5.0,
    idle_timeout: float | None = None,
) -> AsyncIterator[WatchEvent]:
    """Yield every change under `prefix`, exactly once and in revision order, forever.

    start_revision None: list the prefix first (as "put" events), then watch from the list's revision + 1.
    Otherwise watch from `start_revision`; `known` (key -> mod_revision) is the caller's view at that point
    so that a compaction re-list can report keys deleted in the gap.
    Raises only EtcdAuthError (permission refused) or EtcdError for a watch etcd rejects for good;
    unavailability is waited out with jittered back-off.
    """
    view: dict[str, int] = dict(known or {})
    idle = idle_timeout if idle_timeout is not None else max(3 * progress_interval, progress_interval + 5.0)

    relist = start_revision is None
    next_revision = max(1, start_revision or 1)
    attempt = 0
    while True:
        if relist:  # at the start, and after a compaction: the events that bring `view` up to date
            events, revision = await _relist(client, prefix, view)
            for ev in events:
                yield ev
            next_revision = revision + 1
            if meta_events:
                yield WatchEvent("synced", "", None, revision, revision)
            relist = False
        try:
            async for ev in _stream(client, prefix, next_revision, progress_interval, idle):
                attempt = 0
                if ev.type == "progress":
                    next_revision = max(next_revision, ev.revision + 1)
                    if meta_events:
                        yield ev
                    continue
                next_revision = ev.mod_revision + 1
                if ev.type == "put":
                    view[ev.key] = ev.mod_revision
                else:
                    view.pop(ev.key, None)
                yield ev
            # the server ended the stream without an error: re-open it
        except _Compacted as exc:
            log.warning("watch %s: revision %d was compacted (now %d): re-listing", prefix, next_revision,
                        exc.compact_revision)
            relist = True
            continue
        except EtcdAuthError:
            raise
        except _StreamBroken as exc:
            log.info("watch %s: stream broken (%s); resuming from revision %d", prefix, exc, next_revision)
        raise_if_cancelling()
        attempt += 1
        await asyncio.sleep(backoff_delay(attempt, base=0.05, cap=2.0))


async def _relist(client: EtcdClient, prefix: str, view: dict[str, int]) -> tuple[list[WatchEvent], int]:
    """List the prefix (retrying until etcd answers) and return the changes against `view`, updating it."""
    attempt = 0
    while True:
        try:
            kvs, revision = await client.get_prefix(prefix)
            break
        except (EtcdUnavailable, RevisionCompacted) as exc:
            attempt += 1
            log.info("watch %s: list failed (%s), retrying", prefix, exc)
            await asyncio.sleep(backoff_delay(attempt, base=0.1, cap=2.0))
    current = {kv.key: kv for kv in kvs}
    events: list[WatchEvent] = []
    for key in sorted(set(view) - set(current)):
        events.append(WatchEvent("delete", key, None, revision, revision))
        del view[key]
    changed = [kv for kv in kvs if view.get(kv.key) != kv.mod_revision]
    changed.sort(key=lambda kv: (kv.mod_revision, kv.key))
    for kv in changed:
        events.append(WatchEvent("put", kv.key, kv.value, kv.mod_revision, revision, kv.create_revision,
                                 kv.version, kv.lease))
        view[kv.key] = kv.mod_revision
    return events, revision


class _StreamBroken(Exception):
    pass


async def _stream(
    client: EtcdClient, prefix: str, start_revision: int, progress_interval: float, idle_timeout: float
) -> AsyncIterator[WatchEvent]:
    """One watch stream on the active endpoint; raises _StreamBroken / _Compacted / EtcdAuthError."""
    conn = client.active_conn()
    create = rpc_pb2.WatchCreateRequest(
        key=prefix.encode(), range_end=prefix_range_end(prefix), start_revision=start_revision,
        progress_notify=True,
    )

    async def requests() -> AsyncIterator[rpc_pb2.WatchRequest]:
        yield rpc_pb2.WatchRequest(create_request=create)
        while True:
            await asyncio.sleep(progress_interval)
            yield rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())

    metadata = tuple(client.metadata() or ()) + (("hasleader", "true"),)
    call = conn.watch_stub.Watch(requests(), metadata=metadata)
    try:
        while True:
            try:
                resp = await read_stream(call, idle_timeout)
            except asyncio.TimeoutError:
                client.failover(conn)
                raise _StreamBroken(f"no answer from {conn.endpoint.url} for {idle_timeout:g}s") from None
            except grpc.aio.AioRpcError as exc:
                kind = await client.handle_stream_error(conn, exc)
                if kind == "auth":
                    raise EtcdAuthError(f"watch {prefix}: {classify(exc)[1]}") from None
                if kind == "compacted":
                    raise _Compacted(0) from None
                raise _StreamBroken(f"{conn.endpoint.url}: {classify(exc)[1]}") from None
            if resp is grpc.aio.EOF:
                raise _StreamBroken(f"{conn.endpoint.url} closed the stream")
            client.note_revision(resp.header.revision)
            if resp.compact_revision:
                raise _Compacted(resp.compact_revision)
            if resp.canceled:
                reason = resp.cancel_reason or "canceled by the server"
                low = reason.lower()
                if "auth token" in low:
                    await client.reauthenticate()
                    raise _StreamBroken(reason)
                if "permission denied" in low or "user name" in low:
                    raise EtcdAuthError(f"watch {prefix}: {reason}")
                if "no leader" in low or "leader" in low:
                    client.failover(conn)
                    raise _StreamBroken(reason)
                raise EtcdError(f"watch {prefix} canceled: {reason}")
            if resp.created:
                continue
            if not resp.events:
                yield WatchEvent("progress", "", None, 0, resp.header.revision)
                continue
            revision = resp.header.revision
            for ev in resp.events:
                kv = ev.kv
                key = kv.key.decode("utf-8", errors="surrogateescape")
                if ev.type == _DELETE:
                    yield WatchEvent("delete", key, None, kv.mod_revision, revision)
                else:
                    yield WatchEvent("put", key, bytes(kv.value), kv.mod_revision, revision, kv.create_revision,
                                     kv.version, kv.lease)
    finally:
        call.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.sleep(0)

