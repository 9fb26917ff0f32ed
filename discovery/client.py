"""An asyncio etcd v3 client with endpoint failover, TLS, user/password auth and honest write retries.

Built on etcd3aio (its generated etcd v3 API and its unary service wrappers, always called with
`max_attempts=1`): retries, failover and authentication are owned here because etcd3aio retries Put and
Txn blindly after a timeout, and a write whose outcome is unknown must not be applied twice.

Retry rule (see docs/etcd-clients.md):
- reads are retried on transient errors, rotating endpoints, until the call's timeout;
- a write is retried at once when the error proves it never reached a server (connection refused,
  "no leader"); when its outcome is unknown (a timeout, a connection cut mid-call) the key is read back
  on a healthy endpoint and the write is retried only when the read proves it was not applied, else the
  call raises `EtcdWriteUncertain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio._protobuf import LeaseStub, WatchStub, rpc_pb2
from etcd3aio.auth import AuthService
from etcd3aio.cluster import ClusterService
from etcd3aio.kv import KVService, SortOrder, SortTarget, prefix_range_end
from etcd3aio.lease import LeaseService
from etcd3aio.maintenance import MaintenanceService

from discovery.backoff import delay_for
from discovery.config import EtcdConfig, Endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

# Keys per page when listing a prefix (all pages are read at one revision).
PAGE_SIZE = 1000

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Notice a dead or frozen member on long-lived streams (etcd allows pings every >= 5 s with a stream).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # gRPC's default reconnect back-off grows to 120 s: after an etcd outage we want it back within ~1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),  # agents must be back <= 2 s after an outage
    ("grpc.max_receive_message_length", 128 * 1024 * 1024),
]

# Error details that prove a request never reached (or was refused before proposal by) a server.
_NOT_SENT_MARKERS = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: too many requests",
    "name resolution",
    "ssl_error",
    "handshake",
)


# --- errors ------------------------------------------------------------------------------------------
class EtcdError(Exception):
    """Base of the errors this package raises."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout; the message names the endpoints tried."""


class EtcdWriteUncertain(EtcdUnavailable):
    """A write may or may not have been applied (its outcome could not be read back); re-read first."""


class EtcdAuthError(EtcdError):
    """Bad credentials, missing permission, or authentication required but not configured."""


class LeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


class RevisionCompacted(EtcdError):
    """The requested revision was compacted away."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class _RetryWrite(Exception):
    """Raised by a write's verification when the read-back proves the write was not applied."""


# --- values ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> "KeyValue":
        return cls(
            key=kv.key.decode("utf-8", errors="surrogateescape"),
            value=bytes(kv.value),
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            version=kv.version,
            lease=kv.lease,
        )


@dataclass
class MemberStatus:
    endpoint: str
    healthy: bool
    member_id: int = 0
    name: str = ""
    is_leader: bool = False
    revision: int = 0
    raft_term: int = 0
    version: str = ""
    db_size: int = 0
    error: str | None = None


@dataclass
class ClusterStatus:
    members: list[MemberStatus] = field(default_factory=list)
    leader: int = 0  # member id of the leader, 0 when none answered
    revision: int = 0
    version: str = ""

    @property
    def healthy(self) -> bool:
        return self.leader != 0 and any(m.healthy for m in self.members)


# --- error classification ----------------------------------------------------------------------------
def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        if isinstance(cur, grpc.aio.AioRpcError):
            return cur
        cur = cur.__cause__
        seen += 1
    return None


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of an exception from a gRPC call.

    kinds: not_sent | ambiguous | auth_token | auth | lease_not_found | compacted | fatal
    """
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "ambiguous", "timed out"
    rpc = _rpc_error(exc)
    if rpc is None:
        return "fatal", f"{type(exc).__name__}: {exc}"
    code = rpc.code()
    detail = (rpc.details() or "").strip()
    low = detail.lower()
    text = f"{code.name}: {detail}" if detail else code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        if any(marker in low for marker in _NOT_SENT_MARKERS):
            return "not_sent", text
        return "ambiguous", text
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "ambiguous", text
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in low:
        return "not_sent", text
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT) and (
        "invalid auth token" in low or "auth token" in low and "expired" in low or "user name is empty" in low
    ):
        return "auth_token", text
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return "auth", text
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) and (
        "authentication failed" in low or "authentication is not enabled" in low or "permission denied" in low
    ):
        return "auth", text
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in low:
        return "lease_not_found", text
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in low:
        return "compacted", text
    if code == grpc.StatusCode.CANCELLED:
        return "ambiguous", text
    if code == grpc.StatusCode.UNKNOWN and ("leader changed" in low or "timed out" in low):
        return "ambiguous", text
    return "fatal", text


def backoff_delay(attempt: int, base: float = 0.05, cap: float = 1.0) -> float:
    """Full-jitter exponential back-off for in-call retries (attempt counts from 0): anywhere in
    [0, min(cap, base * 2**attempt)]; discovery.backoff is the one calculator."""
    return delay_for(attempt + 1, base=base, cap=max(cap, base), jitter=1.0)


async def read_stream(call: Any, timeout: float) -> Any:
    """`await call.read()` with a timeout (raises asyncio.TimeoutError), without asyncio.wait_for.

    On Python < 3.12, wait_for can swallow the caller's cancellation: when the inner read, cancelled on
    the caller's behalf, ends with grpc's own error instead of CancelledError, wait_for returns that, and a
    watch loop being stopped would just reconnect forever. asyncio.wait never does that.
    """
    read = asyncio.ensure_future(call.read())
    read.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait({read}, timeout=timeout)
    except BaseException:
        read.cancel()
        raise
    if not done:
        read.cancel()
        raise asyncio.TimeoutError
    return read.result()


def raise_if_cancelling() -> None:
    """Re-raise a cancellation some library call swallowed (retry loops call this before retrying)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _retrieve(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()  # mark it retrieved: a cancelled read's error is expected, not news


# --- one endpoint -------------------------------------------------------------------------------------
class _Conn:
    """A gRPC channel to one endpoint and the etcd3aio services on it (all with max_attempts=1)."""

    def __init__(self, endpoint: Endpoint, config: EtcdConfig) -> None:
        self.endpoint = endpoint
        if config.tls or endpoint.tls:
            ca, key, cert = config.read_tls_files()
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self.channel = grpc.aio.secure_channel(endpoint.target, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)
        self.kv = KVService(self.channel, max_attempts=1)
        self.lease = LeaseService(self.channel, max_attempts=1)
        self.maintenance = MaintenanceService(self.channel, max_attempts=1)
        self.cluster = ClusterService(self.channel, max_attempts=1)
        self.auth = AuthService(self.channel, max_attempts=1)  # its calls carry the token too
        self.login = AuthService(self.channel, max_attempts=1)  # token-less: only for Authenticate
        self.watch_stub = WatchStub(self.channel)
        self.lease_stub = LeaseStub(self.channel)

    def set_token(self, token: str | None) -> None:
        for svc in (self.kv, self.lease, self.maintenance, self.cluster, self.auth):
            svc.set_token(token)

    async def close(self) -> None:
        await self.channel.close()


# --- the client ---------------------------------------------------------------------------------------
class EtcdClient:
    """See docs/internals.md ("discovery API"). Every call is bounded by `config.timeout`."""

    def __init__(self, config: EtcdConfig | None = None) -> None:
        self.config = config or EtcdConfig.from_env()
        self._conns: list[_Conn] = []
        self._active = 0
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        # Highest store revision seen in any answer: a lower bound for "before this call" (write checks).
        self.last_revision = 0

    # --- lifecycle --------------------------------------------------------------------------------
    async def connect(self) -> "EtcdClient":
        """Open channels (lazily connected). Contacts etcd only when user/password auth is configured."""
        if self._conns:
            return self
        self._closed = False
        self._conns = [_Conn(ep, self.config) for ep in self.config.parsed_endpoints]
        self._active = random.randrange(len(self._conns))  # spread clients over members
        if self.config.user:
            await self._authenticate()
            self._refresher = asyncio.create_task(self._refresh_token_forever(), name="etcd-token-refresh")
        return self

    async def close(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()

    async def __aenter__(self) -> "EtcdClient":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoints(self) -> list[str]:
        return list(self.config.endpoints)

    # --- endpoint choice (also used by watch and lease streams) ----------------------------------
    def active_conn(self) -> _Conn:
        if not self._conns:
            raise EtcdError("EtcdClient is not connected (call `await client.connect()` first)")
        return self._conns[self._active % len(self._conns)]

    def failover(self, conn: _Conn) -> None:
        """The given endpoint failed: move to the next one (once, even if several calls report it)."""
        if len(self._conns) > 1 and self._conns[self._active % len(self._conns)] is conn:
            self._active = (self._active + 1) % len(self._conns)
            log.info("etcd: %s failed, switching to %s", conn.endpoint.url, self.active_conn().endpoint.url)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    def note_revision(self, revision: int) -> None:
        if revision > self.last_revision:
            self.last_revision = revision

    # --- authentication ---------------------------------------------------------------------------
    async def _authenticate(self, stale_token: str | None = None) -> None:
        """Get a fresh token (once for all concurrent callers that saw `stale_token` fail)."""
        async with self._auth_lock:
            if stale_token is not None and self._token != stale_token:
                return  # someone else refreshed it meanwhile
            assert self.config.user
            password = self.config.password.get_secret_value() if self.config.password else ""
            user = self.config.user

            async def call(conn: _Conn, timeout: float) -> str:
                resp = await conn.login.authenticate(user, password, timeout=timeout, max_attempts=1)
                return resp.token

            token = await self._run("Auth.Authenticate", call, authenticate=False)
            self._token = token
            for conn in self._conns:
                conn.set_token(token)

    async def _refresh_token_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.token_refresh_interval)
            try:
                await self._authenticate()
            except EtcdAuthError:
                log.error("etcd: re-authentication of user %s was refused", self.config.user)
            except EtcdError as exc:
                log.warning("etcd: token refresh failed, will retry: %s", exc)

    async def reauthenticate(self) -> None:
        """Replace the current token (streams call this when etcd says it expired)."""
        if self.config.user:
            await self._authenticate(stale_token=self._token)

    async def handle_stream_error(self, conn: _Conn, exc: BaseException) -> str:
        """For watch/keepalive streams: classify, refresh an expired token, fail over. Returns the kind."""
        kind, detail = classify(exc)
        if kind == "auth_token" and self.config.user:
            with contextlib.suppress(EtcdError):
                await self._authenticate(stale_token=self._token)
        elif kind in ("not_sent", "ambiguous"):
            self.failover(conn)
        log.debug("etcd stream on %s: %s (%s)", conn.endpoint.url, detail, kind)
        return kind

    # --- the retry loop ---------------------------------------------------------------------------
    async def _run(
        self,
        op: str,
        call: Callable[[_Conn, float], Awaitable[T]],
        *,
        write: bool = False,
        verify: Callable[[int], Awaitable[T]] | None = None,
        timeout: float | None = None,
        authenticate: bool = True,
    ) -> T:
        loop = asyncio.get_running_loop()
        budget = timeout if timeout is not None else self.config.timeout
        deadline = loop.time() + budget
        pre_revision = self.last_revision
        errors: dict[str, str] = {}
        attempt = 0
        reauthed = False
        while True:
            if self._closed:
                raise EtcdError("EtcdClient is closed")
            conn = self.active_conn()
            remaining = deadline - loop.time()
            if remaining <= 0:
                tried = "; ".join(f"{url}: {err}" for url, err in errors.items()) or "no attempt finished"
                raise EtcdUnavailable(f"{op}: no etcd endpoint answered within {budget:g}s (tried {tried})")
            # One attempt gets a third of the budget: a member without a leader drops proposals and
            # would otherwise hold the whole call until etcd's own request timeout.
            per_attempt = min(remaining, max(0.5, budget / 3))
            try:
                return await call(conn, per_attempt)
            except Exception as exc:  # noqa: BLE001 - classified below; CancelledError passes through
                kind, detail = classify(exc)
            if kind == "auth_token" and authenticate and self.config.user and not reauthed:
                reauthed = True
                await self._authenticate(stale_token=self._token)
                continue  # the request was refused before it was applied
            if kind == "auth":
                hint = "" if self.config.user or self.config.cert else " (etcd needs a user: --etcd-user)"
                raise EtcdAuthError(f"{op}: {detail}{hint}")
            if kind == "auth_token":
                raise EtcdAuthError(f"{op}: {detail} (configure --etcd-user/--etcd-password)")
            if kind == "lease_not_found":
                raise LeaseNotFound(f"{op}: {detail}")
            if kind == "compacted":
                raise RevisionCompacted(f"{op}: {detail}")
            if kind == "fatal":
                raise EtcdError(f"{op} on {conn.endpoint.url}: {detail}")
            errors[conn.endpoint.url] = detail
            self.failover(conn)
            if write and kind == "ambiguous":
                if verify is None:
                    raise EtcdWriteUncertain(f"{op}: outcome unknown after {detail} on {conn.endpoint.url}")
                try:
                    return await verify(pre_revision)
                except _RetryWrite:
                    log.info("etcd: %s was not applied (%s), retrying", op, detail)
                except EtcdWriteUncertain:
                    raise
                except EtcdError as exc:
                    raise EtcdWriteUncertain(f"{op}: outcome unknown after {detail}; read-back failed: {exc}") from None
            attempt += 1
            delay = min(backoff_delay(attempt), max(0.0, deadline - loop.time()))
            await asyncio.sleep(delay)

    # --- reads ------------------------------------------------------------------------------------
    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        async def call(conn: _Conn, t: float) -> KeyValue | None:
            resp = await conn.kv.get(key, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return KeyValue.from_pb(resp.kvs[0]) if resp.kvs else None

        return await self._run("KV.Range", call, timeout=timeout)

    async def get_prefix(
        self, prefix: str, *, revision: int = 0, keys_only: bool = False, timeout: float | None = None
    ) -> tuple[list[KeyValue], int]:
        """All keys under `prefix`, sorted by key, read at one revision (paged); returns (kvs, revision)."""
        end = prefix_range_end(prefix)
        out: list[KeyValue] = []
        start: bytes = prefix.encode()
        at = revision
        while True:
            async def call(conn: _Conn, t: float, start: bytes = start, at: int = at) -> Any:
                return await conn.kv.get(
                    start, end, revision=at, limit=PAGE_SIZE, sort_order=SortOrder.ASCEND,
                    sort_target=SortTarget.KEY, keys_only=keys_only, timeout=t, max_attempts=1,
                )

            resp = await self._run("KV.Range", call, timeout=timeout)
            if at == 0:
                at = resp.header.revision
            self.note_revision(resp.header.revision)
            out.extend(KeyValue.from_pb(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return out, at
            start = bytes(resp.kvs[-1].key) + b"\x00"

    # --- writes -----------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: int | None = None, *, timeout: float | None = None) -> int:
        """Write `value`; returns the revision of the write."""
        lease_id = lease or 0

        async def call(conn: _Conn, t: float) -> int:
            resp = await conn.kv.put(key, value, lease=lease_id, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return resp.header.revision

        async def verify(pre: int) -> int:
            kv = await self.get(key, timeout=timeout)
            if kv is None or kv.mod_revision <= pre:
                raise _RetryWrite
            if kv.value == value and kv.lease == lease_id:
                return kv.mod_revision
            raise EtcdWriteUncertain(f"put {key}: outcome unknown and the key was changed concurrently")

        return await self._run("KV.Put", call, write=True, verify=verify, timeout=timeout)

    async def delete(self, key: str, *, timeout: float | None = None) -> int:
        """Delete one key; returns how many were deleted (0 or 1)."""

        async def call(conn: _Conn, t: float) -> int:
            resp = await conn.kv.delete(key, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return resp.deleted

        async def verify(pre: int) -> int:
            kv = await self.get(key, timeout=timeout)
            if kv is None:
                return 1  # gone: the first attempt (or a concurrent delete) removed it
            if kv.mod_revision <= pre:
                raise _RetryWrite
            raise EtcdWriteUncertain(f"delete {key}: outcome unknown and the key was re-written concurrently")

        return await self._run("KV.DeleteRange", call, write=True, verify=verify, timeout=timeout)

    async def delete_prefix(self, prefix: str, *, timeout: float | None = None) -> int:
        end = prefix_range_end(prefix)

        async def call(conn: _Conn, t: float) -> int:
            resp = await conn.kv.delete(prefix, end, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return resp.deleted

        async def verify(pre: int) -> int:
            kvs, _ = await self.get_prefix(prefix, keys_only=True, timeout=timeout)
            if any(kv.mod_revision <= pre for kv in kvs):
                raise _RetryWrite
            return 0  # applied (only keys written after it remain); the count is unknown

        return await self._run("KV.DeleteRange", call, write=True, verify=verify, timeout=timeout)

    async def _txn(self, op: str, compare: list[Any], success: list[Any], verify: Callable[[int], Awaitable[bool]],
                   timeout: float | None) -> bool:
        async def call(conn: _Conn, t: float) -> bool:
            resp = await conn.kv.txn(compare, success, [], timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return bool(resp.succeeded)

        return await self._run(op, call, write=True, verify=verify, timeout=timeout)

    async def create(self, key: str, value: bytes, lease: int | None = None, *, timeout: float | None = None) -> bool:
        """Create-if-absent: True when this call created the key."""
        lease_id = lease or 0

        async def verify(pre: int) -> bool:
            kv = await self.get(key, timeout=timeout)
            if kv is None:
                raise _RetryWrite
            if kv.create_revision <= pre:
                return False  # it existed before the call: the compare failed
            if kv.value == value and kv.lease == lease_id:
                return True
            raise EtcdWriteUncertain(f"create {key}: outcome unknown and the key was written concurrently")

        return await self._txn(
            "KV.Txn(create)",
            [KVService.txn_compare_create_revision(key, 0)],
            [KVService.txn_op_put(key, value, lease=lease_id)],
            verify, timeout,
        )

    async def compare_and_swap(
        self, key: str, value: bytes, mod_revision: int, lease: int | None = None, *, timeout: float | None = None
    ) -> bool:
        """Write only if the key's mod_revision is still `mod_revision` (0: only if it does not exist)."""
        if mod_revision == 0:
            return await self.create(key, value, lease, timeout=timeout)
        lease_id = lease or 0

        async def verify(pre: int) -> bool:
            kv = await self.get(key, timeout=timeout)
            if kv is not None and kv.mod_revision == mod_revision:
                raise _RetryWrite
            if kv is not None and kv.mod_revision > pre and kv.value == value and kv.lease == lease_id:
                return True
            if kv is None or kv.mod_revision <= pre:
                return False  # changed (or deleted) before the call: the compare failed
            raise EtcdWriteUncertain(f"compare_and_swap {key}: outcome unknown and the key changed concurrently")

        compare = rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD, key=key.encode(),
                                  mod_revision=mod_revision)
        return await self._txn("KV.Txn(cas)", [compare], [KVService.txn_op_put(key, value, lease=lease_id)],
                               verify, timeout)

    async def delete_if(self, key: str, mod_revision: int, *, timeout: float | None = None) -> bool:
        """Delete only if the key's mod_revision is still `mod_revision`."""

        async def verify(pre: int) -> bool:
            kv = await self.get(key, timeout=timeout)
            if kv is None:
                return True  # gone
            if kv.mod_revision == mod_revision:
                raise _RetryWrite
            if kv.mod_revision <= pre:
                return False
            raise EtcdWriteUncertain(f"delete_if {key}: outcome unknown and the key changed concurrently")

        compare = rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.MOD, key=key.encode(),
                                  mod_revision=mod_revision)
        return await self._txn("KV.Txn(delete_if)", [compare], [KVService.txn_op_delete(key)], verify, timeout)

    async def compact(self, revision: int, *, physical: bool = True, timeout: float | None = None) -> None:
        """Drop history before `revision` (operators and tests)."""

        async def call(conn: _Conn, t: float) -> None:
            await conn.kv.compact(revision, physical=physical, timeout=t, max_attempts=1)

        try:
            await self._run("KV.Compact", call, timeout=timeout)
        except RevisionCompacted:
            pass  # already compacted at or beyond it

    # --- leases -----------------------------------------------------------------------------------
    async def grant(self, ttl: int, *, timeout: float | None = None) -> int:
        """A new lease; a retried grant can at worst leave an unused lease that expires after `ttl`."""

        async def call(conn: _Conn, t: float) -> int:
            resp = await conn.lease.grant(int(ttl), timeout=t, max_attempts=1)
            if resp.error:
                raise EtcdError(f"Lease.Grant: {resp.error}")
            self.note_revision(resp.header.revision)
            return int(resp.ID)

        return await self._run("Lease.Grant", call, timeout=timeout)

    async def revoke(self, lease_id: int, *, timeout: float | None = None) -> bool:
        """Revoke (idempotent): True when it was revoked now, False when it was already gone."""

        async def call(conn: _Conn, t: float) -> bool:
            resp = await conn.lease.revoke(lease_id, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return True

        try:
            return await self._run("Lease.Revoke", call, timeout=timeout)
        except LeaseNotFound:
            return False

    async def time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Seconds left on the lease, -1 when it does not exist (expired or revoked)."""

        async def call(conn: _Conn, t: float) -> int:
            resp = await conn.lease.time_to_live(lease_id, timeout=t, max_attempts=1)
            self.note_revision(resp.header.revision)
            return int(resp.TTL) if resp.TTL >= 0 else -1

        try:
            return await self._run("Lease.TimeToLive", call, timeout=timeout)
        except LeaseNotFound:
            return -1

    # --- cluster ----------------------------------------------------------------------------------
    async def status(self, *, timeout: float | None = None) -> ClusterStatus:
        """Ask every configured endpoint for its status (concurrently) plus the member list."""
        budget = min(timeout or self.config.timeout, self.config.timeout)

        async def one(conn: _Conn) -> MemberStatus:
            try:
                resp = await conn.maintenance.status(timeout=budget, max_attempts=1)
            except Exception as exc:  # noqa: BLE001 - reported per member
                return MemberStatus(endpoint=conn.endpoint.url, healthy=False, error=classify(exc)[1])
            errors = list(resp.errors)
            return MemberStatus(
                endpoint=conn.endpoint.url, healthy=not errors and resp.leader != 0,
                member_id=resp.header.member_id, is_leader=resp.leader == resp.header.member_id and resp.leader != 0,
                revision=resp.header.revision, raft_term=resp.raftTerm, version=resp.version, db_size=resp.dbSize,
                error="; ".join(errors) or (None if resp.leader else "no leader"),
            )

        if not self._conns:
            raise EtcdError("EtcdClient is not connected")
        members = list(await asyncio.gather(*(one(conn) for conn in self._conns)))
        names: dict[int, str] = {}
        with contextlib.suppress(EtcdError):
            async def call(conn: _Conn, t: float) -> Any:
                return await conn.cluster.member_list(timeout=t, max_attempts=1)

            resp = await self._run("Cluster.MemberList", call, timeout=budget)
            names = {m.ID: m.name for m in resp.members}
        leader = 0
        for m in members:
            m.name = names.get(m.member_id, "")
            if m.is_leader:
                leader = m.member_id
        answered = [m for m in members if m.error is None or m.revision]
        revision = max((m.revision for m in answered), default=0)
        version = next((m.version for m in members if m.version), "")
        return ClusterStatus(members=members, leader=leader, revision=revision, version=version)
