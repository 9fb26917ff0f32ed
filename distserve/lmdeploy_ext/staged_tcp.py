"""KV migration over DLSlime's TCP endpoint with host staging, for hosts without RDMA.

One `StagedTcpLink` per (local engine, remote engine) pair, on both engines, as lmdeploy keeps one
transfer endpoint per peer. The decode side pulls, as lmdeploy does:

1. decode -> prefill control call "stage": the byte ranges of the prefill's KV regions it needs
   (validated on both sides against the advertised region sizes);
2. the prefill copies those ranges from its (GPU) KV pool into a pinned host staging buffer that is
   registered with its DLSlime TcpEndpoint, packed back to back, and answers with the byte count;
3. the decode reads the packed bytes with DLSlime TCP reads into its own host landing buffer
   (<=31 assignments a call, <=2 calls in flight, futures polled, never a blocking wait on the loop);
4. the decode scatters the landing buffer into its own (GPU) KV pool on a side stream, in a worker
   thread, and moves to the next round (a round is at most the staging capacity).

DLSlime TCP itself checks nothing (any peer may read any address of the process): the endpoint and the
control port bind to the engine's own interface, the control port needs the per-link token, and only
the staging buffer, never the KV pool, is registered with DLSlime.

No lmdeploy import here: the CPU tests drive this module with CPU tensors between two processes.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from distserve.lmdeploy_ext.settings import StagedTcpSettings  # re-exported: defined with its env vars

logger = logging.getLogger("distserve.lmdeploy_ext")

# DLSlime TCP defects (../shared/notes/dlslime.md): a 32-bit completion mask, one TCP connection per
# assignment against a listen backlog of 64.
MAX_ASSIGNMENTS_PER_CALL = 31
MAX_CALLS_IN_FLIGHT = 2
LINK_KIND = "distserve-staged-tcp"
LINK_VERSION = 1
STAGING_NAME = "distserve_staging"
LANDING_NAME = "distserve_landing"
_FRAME = struct.Struct("!I")
MAX_FRAME_BYTES = 64 << 20


class MigrationError(RuntimeError):
    """A KV migration could not complete (bad request, peer gone, deadline passed)."""


@dataclass(frozen=True)
class Segment:
    """Copy `length` bytes at `remote_offset` of the peer's region `key` to `local_offset` of ours."""

    key: int
    remote_offset: int
    local_offset: int
    length: int


@dataclass
class Region:
    key: int
    addr: int
    length: int
    device: str  # "cpu" or "cuda:N"


@dataclass
class MigrationStats:
    """Process-wide counters, read by the api_server's /distserve/ext/status."""

    migrations: int = 0
    failures: int = 0
    bytes: int = 0
    segments: int = 0
    rounds: int = 0
    stage_s: float = 0.0  # control round trips, including the prefill's device->host copy
    read_s: float = 0.0  # DLSlime TCP reads
    scatter_s: float = 0.0  # host->device copies on the decode
    total_s: float = 0.0
    staged_bytes_served: int = 0  # as a prefill
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        gib = out["bytes"] / (1 << 30)
        out["gib_per_s_total"] = round(gib / out["total_s"], 3) if out["total_s"] else None
        out["gib_per_s_read"] = round(gib / out["read_s"], 3) if out["read_s"] else None
        return out

    def add(self, **deltas: Any) -> None:
        with self._lock:
            for k, v in deltas.items():
                if k == "last_error":
                    self.last_error = v
                else:
                    setattr(self, k, getattr(self, k) + v)


STATS = MigrationStats()


# ---------------------------------------------------------------------------------------------------
# Pure planning and validation (unit-tested without sockets)



def _check_range(side: str, regions: dict, key, offset: int, length: int) -> None:
    """The byte range [offset, offset + length) lies inside the `side` ("remote"/"local") region `key`."""
    size = regions.get(key)
    if size is None:
        raise MigrationError(f"unknown {side} region {key} (known: {sorted(regions)})")
    if offset + length > size:
        raise MigrationError(f"{side} range [{offset}, {offset + length}) is outside region {key} of {size} bytes")

def validate_segments(
    segments: Iterable[Segment], remote_regions: dict[int, int], local_regions: dict[int, int] | None = None
) -> list[Segment]:
    """Reject a segment that is not inside an advertised region (DLSlime TCP checks nothing itself)."""
    out = []
    for s in segments:
        for name in ("key", "remote_offset", "local_offset", "length"):
            v = getattr(s, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise MigrationError(f"segment {name} must be an integer, got {v!r}")
        if s.length <= 0 or s.remote_offset < 0 or s.local_offset < 0:
            raise MigrationError(f"segment has a negative offset or an empty length: {s}")
        _check_range("remote", remote_regions, s.key, s.remote_offset, s.length)
        if local_regions is not None:
            _check_range("local", local_regions, s.key, s.local_offset, s.length)
        out.append(s)
    return out


def coalesce(segments: Sequence[Segment]) -> list[Segment]:
    """Merge segments contiguous on both sides (consecutive blocks of one layer become one copy)."""
    ordered = sorted(segments, key=lambda s: (s.key, s.remote_offset, s.local_offset))
    out: list[Segment] = []
    for s in ordered:
        if out:
            p = out[-1]
            if (
                p.key == s.key
                and p.remote_offset + p.length == s.remote_offset
                and p.local_offset + p.length == s.local_offset
            ):
                out[-1] = Segment(p.key, p.remote_offset, p.local_offset, p.length + s.length)
                continue
        out.append(s)
    return out


def plan_rounds(segments: Sequence[Segment], capacity: int) -> list[list[Segment]]:
    """Group segments into rounds of at most `capacity` bytes, splitting segments larger than it."""
    if capacity <= 0:
        raise ValueError("capacity must be > 0")
    rounds: list[list[Segment]] = []
    current: list[Segment] = []
    used = 0
    for s in segments:
        offset = 0
        while offset < s.length:
            room = capacity - used
            if room == 0:
                rounds.append(current)
                current, used = [], 0
                room = capacity
            take = min(room, s.length - offset)
            current.append(Segment(s.key, s.remote_offset + offset, s.local_offset + offset, take))
            used += take
            offset += take
    if current:
        rounds.append(current)
    return rounds


def chunk_calls(
    nbytes: int, chunk_bytes: int, per_call: int = MAX_ASSIGNMENTS_PER_CALL
) -> list[list[tuple[int, int]]]:
    """Split [0, nbytes) into (offset, length) chunks, grouped into calls of at most `per_call`."""
    if not 0 < per_call <= MAX_ASSIGNMENTS_PER_CALL:
        raise ValueError(f"per_call must be in 1..{MAX_ASSIGNMENTS_PER_CALL}")
    chunks = [(off, min(chunk_bytes, nbytes - off)) for off in range(0, nbytes, chunk_bytes)]
    return [chunks[i : i + per_call] for i in range(0, len(chunks), per_call)]


# ---------------------------------------------------------------------------------------------------
# Memory


class _CudaPointer:
    """Wraps a raw device pointer so torch can view it without a copy (__cuda_array_interface__)."""

    def __init__(self, addr: int, length: int):
        self.__cuda_array_interface__ = {
            "shape": (length,),
            "typestr": "|u1",
            "data": (addr, False),
            "version": 3,
            "strides": None,
        }


def byte_view(addr: int, length: int, device: str):
    """A uint8 torch tensor over `length` bytes at `addr` (no copy)."""
    import torch  # lazy: planning and the control channel need no torch (CPU tests, cold import)

    if device.startswith("cuda"):
        return torch.as_tensor(_CudaPointer(addr, length), device=device)
    buf = (ctypes.c_uint8 * length).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8)


def host_buffer(nbytes: int, device_hint: str):
    """Pinned host memory when CUDA is in use (async device copies), plain memory otherwise."""
    import torch  # lazy: planning and the control channel need no torch (CPU tests, cold import)

    pin = device_hint.startswith("cuda") and torch.cuda.is_available()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class _Copier:
    """Byte copies between host buffers and regions on one side stream, in the calling thread."""

    def __init__(self, device: str):
        self.device = device
        self._stream = None

    def copy(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        """pairs: (dst tensor, src tensor) of equal length."""
        import torch  # lazy: planning and the control channel need no torch (CPU tests, cold import)

        if self.device.startswith("cuda"):
            index = torch.device(self.device).index or 0
            torch.cuda.set_device(index)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=index)
            with torch.cuda.stream(self._stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
            self._stream.synchronize()
        else:
            for dst, src in pairs:
                dst.copy_(src)


# ---------------------------------------------------------------------------------------------------
# Control channel: 4-byte length + JSON


def _send_frame_sync(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv_exact_sync(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the control connection")
        buf += chunk
    return bytes(buf)


def _recv_frame_sync(sock: socket.socket) -> dict:
    (n,) = _FRAME.unpack(_recv_exact_sync(sock, _FRAME.size))
    if n > MAX_FRAME_BYTES:
        raise ConnectionError(f"control frame of {n} bytes is over the limit")
    obj = json.loads(_recv_exact_sync(sock, n))
    if not isinstance(obj, dict):
        raise ConnectionError("control frame is not an object")
    return obj


async def _send_frame(writer: asyncio.StreamWriter, obj: dict) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    writer.write(_FRAME.pack(len(data)) + data)
    await writer.drain()


async def _recv_frame(reader: asyncio.StreamReader) -> dict:
    (n,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if n > MAX_FRAME_BYTES:
        raise MigrationError(f"control frame of {n} bytes is over the limit")
    obj = json.loads(await reader.readexactly(n))
    if not isinstance(obj, dict):
        raise MigrationError("control frame is not an object")
    return obj


def resolve_bind_host(engine_url_host: str | None, override: str | None = None) -> str:
    """The interface to bind transfer ports to: the engine's own address, never 0.0.0.0."""
    host = override or engine_url_host or "127.0.0.1"
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        raise MigrationError(f"cannot resolve the transfer host {host!r}") from None
    if ip == "0.0.0.0":
        raise MigrationError(
            "the engine id has host 0.0.0.0: start the engine with --server-name set to its private "
            "address, or set DISTSERVE_LMDEPLOY_TRANSFER_HOST"
        )
    return ip


# ---------------------------------------------------------------------------------------------------
# The link


class StagedTcpLink:
    """One engine's side of a staged TCP link to one peer (serves stage requests, and pulls)."""

    def __init__(self, host: str, settings: StagedTcpSettings | None = None, name: str = ""):
        from dlslime import TcpEndpoint  # optional dependency (distserve[lmdeploy]), needed only here

        self.settings = settings or StagedTcpSettings()
        self.name = name or "link"
        self.host = host
        self.token = secrets.token_hex(16)
        self.endpoint = TcpEndpoint(ip=host, port=0)
        self.regions: dict[int, Region] = {}
        self._lock = threading.Lock()  # regions, buffers
        self._staging = None  # host tensor, lazily
        self._staging_mr: dict | None = None
        self._staging_busy = threading.Lock()  # one decode round trip at a time uses the staging buffer
        self._landing = None
        self._landing_handle: int | None = None
        self._stale_buffers: list[Any] = []  # buffers a timed-out read may still write into: kept alive
        self._remote: dict | None = None
        self._remote_staging_handle: int | None = None
        self._remote_staging_addr: int | None = None
        self._serve_copier: _Copier | None = None
        self._pull_copier: _Copier | None = None
        self._pull_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distserve-kv-scatter")
        self._pull_lock: asyncio.Lock | None = None
        self._closed = False
        self._server = socket.create_server((host, 0), backlog=16)
        self.control_port = self._server.getsockname()[1]
        self._server_thread = threading.Thread(
            target=self._serve_forever, name=f"distserve-kv-control-{self.name}", daemon=True
        )
        self._server_thread.start()

    # -- setup ---------------------------------------------------------------------------------

    def register_region(self, key: int, addr: int, length: int, device: str) -> None:
        if length <= 0 or addr <= 0:
            raise MigrationError(f"region {key} has no memory")
        with self._lock:
            self.regions[int(key)] = Region(int(key), int(addr), int(length), device)

    def endpoint_info(self) -> dict:
        """What the peer needs (travels in lmdeploy's kvtransfer endpoint_info string, not in etcd)."""
        return {
            "kind": LINK_KIND,
            "version": LINK_VERSION,
            "slime": {"host": self.host, "port": self.endpoint.endpoint_info()["port"], "mr_info": {}},
            "control": {"host": self.host, "port": self.control_port},
            "token": self.token,
            "regions": {str(k): r.length for k, r in sorted(self.regions.items())},
            "staging_bytes": self.settings.staging_bytes,
        }

    def connect(self, remote: dict) -> None:
        """Accept the peer's endpoint_info (validated: it decides what we read and from where)."""
        if not isinstance(remote, dict) or remote.get("kind") != LINK_KIND:
            raise MigrationError(f"peer endpoint is not a {LINK_KIND} endpoint")
        if remote.get("version") != LINK_VERSION:
            raise MigrationError(
                f"peer speaks {LINK_KIND} version {remote.get('version')}, we speak {LINK_VERSION}"
            )
        try:
            regions = {int(k): int(v) for k, v in dict(remote["regions"]).items()}
            control = (str(remote["control"]["host"]), int(remote["control"]["port"]))
            slime = {
                "host": str(remote["slime"]["host"]),
                "port": int(remote["slime"]["port"]),
                "mr_info": {},
            }
            token = str(remote["token"])
            staging_bytes = int(remote["staging_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise MigrationError(f"malformed peer endpoint info: {e!r}") from None
        if staging_bytes <= 0 or any(v <= 0 for v in regions.values()):
            raise MigrationError("peer endpoint advertises empty regions or staging")
        self.endpoint.connect(slime)
        self._remote = {
            "regions": regions,
            "control": control,
            "token": token,
            "staging_bytes": staging_bytes,
        }
        self._remote_staging_handle = None
        self._remote_staging_addr = None

    @property
    def connected(self) -> bool:
        return self._remote is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._server.close()
        except OSError:
            pass
        self._pull_executor.shutdown(wait=False)
        try:
            self.endpoint.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            logger.debug("dlslime endpoint shutdown failed", exc_info=True)

    # -- serving side (the prefill) ---------------------------------------------------------------

    def _serve_forever(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve_connection,
                args=(conn,),
                daemon=True,
                name=f"distserve-kv-stage-{self.name}",
            ).start()

    def _ensure_staging(self) -> dict:
        with self._lock:
            if self._staging is None:
                device = next(iter(self.regions.values())).device if self.regions else "cpu"
                self._staging = host_buffer(self.settings.staging_bytes, device)
                self.endpoint.register_memory_region(
                    STAGING_NAME, self._staging.data_ptr(), 0, self.settings.staging_bytes
                )
                self._staging_mr = self.endpoint.endpoint_info()["mr_info"][STAGING_NAME]
                self._serve_copier = _Copier(device)
            return self._staging_mr

    def _serve_connection(self, conn: socket.socket) -> None:
        held = False
        conn.settimeout(self.settings.control_timeout_s + self.settings.deadline_s)
        try:
            hello = _recv_frame_sync(conn)
            if hello.get("op") != "hello" or not hmac.compare_digest(str(hello.get("token", "")), self.token):
                _send_frame_sync(conn, {"ok": False, "error": "bad link token"})
                return
            _send_frame_sync(conn, {"ok": True})
            while True:
                msg = _recv_frame_sync(conn)
                op = msg.get("op")
                if op == "done":
                    _send_frame_sync(conn, {"ok": True})
                    return
                if op != "stage":
                    _send_frame_sync(conn, {"ok": False, "error": f"unknown op {op!r}"})
                    return
                if not held:
                    if not self._staging_busy.acquire(timeout=self.settings.deadline_s):
                        _send_frame_sync(conn, {"ok": False, "error": "staging buffer busy"})
                        return
                    held = True
                try:
                    nbytes, mr = self._stage(msg.get("ranges"))
                except MigrationError as e:
                    _send_frame_sync(conn, {"ok": False, "error": str(e)})
                    return
                _send_frame_sync(conn, {"ok": True, "nbytes": nbytes, "staging": mr})
        except (OSError, ConnectionError, ValueError) as e:
            logger.warning("kv staging connection ended: %s", e)
        finally:
            if held:
                self._staging_busy.release()
            conn.close()

    def _stage(self, ranges: Any) -> tuple[int, dict]:
        """Copy the requested [key, offset, length] ranges of our regions into staging, back to back."""
        if not isinstance(ranges, list) or not ranges:
            raise MigrationError("stage request has no ranges")
        with self._lock:
            lengths = {k: r.length for k, r in self.regions.items()}
            regions = dict(self.regions)
        segs = []
        for item in ranges:
            if not isinstance(item, list) or len(item) != 3:
                raise MigrationError(f"malformed range {item!r}")
            segs.append(Segment(item[0], item[1], 0, item[2]))
        validate_segments(segs, lengths)
        total = sum(s.length for s in segs)
        if total > self.settings.staging_bytes:
            raise MigrationError(
                f"stage request of {total} bytes exceeds the {self.settings.staging_bytes}-byte staging"
            )
        mr = self._ensure_staging()
        pairs, pos = [], 0
        for s in segs:
            r = regions[s.key]
            src = byte_view(r.addr, r.length, r.device)[s.remote_offset : s.remote_offset + s.length]
            pairs.append((self._staging[pos : pos + s.length], src))
            pos += s.length
        self._serve_copier.copy(pairs)
        STATS.add(staged_bytes_served=total)
        return total, mr

    # -- pulling side (the decode) ---------------------------------------------------------------

    def _ensure_landing(self) -> None:
        with self._lock:
            if self._landing is None:
                device = next(iter(self.regions.values())).device if self.regions else "cpu"
                self._landing = host_buffer(self.settings.staging_bytes, device)
                self._landing_handle = self.endpoint.register_memory_region(
                    LANDING_NAME + f"_{len(self._stale_buffers)}",
                    self._landing.data_ptr(),
                    0,
                    self.settings.staging_bytes,
                )
                self._pull_copier = _Copier(device)

    def _retire_landing(self) -> None:
        """After a timed-out read the peer may still write into the landing buffer: never reuse it."""
        with self._lock:
            if self._landing is not None:
                self._stale_buffers.append(self._landing)
                self._landing = None
                self._landing_handle = None

    async def migrate(self, segments: Sequence[Segment]) -> dict:
        """Pull `segments` of the peer's regions into ours; raises MigrationError (after bounded retries)."""
        if self._remote is None:
            raise MigrationError("link is not connected")
        if self._pull_lock is None:
            self._pull_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.settings.deadline_s
        with self._lock:
            local_lengths = {k: r.length for k, r in self.regions.items()}
        segs = coalesce(validate_segments(segments, self._remote["regions"], local_lengths))
        if not segs:
            return {"bytes": 0}
        capacity = min(self.settings.staging_bytes, self._remote["staging_bytes"])
        rounds = plan_rounds(segs, capacity)
        attempt = 0
        async with self._pull_lock:
            while True:
                attempt += 1
                try:
                    timings = await self._pull(rounds, deadline)
                    break
                except (MigrationError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                    err = e if isinstance(e, MigrationError) else MigrationError(f"{type(e).__name__}: {e}")
                    STATS.add(failures=1, last_error=str(err))
                    # Bounded, jittered retry while the deadline allows; the peer may have been busy.
                    if attempt >= 3 or loop.time() + 0.5 > deadline or "outside region" in str(err):
                        raise err from None
                    delay = min(0.2 * attempt, 1.0) * (0.5 + secrets.randbelow(1000) / 1000)
                    logger.warning(
                        "kv migration attempt %d failed (%s); retrying in %.2fs", attempt, err, delay
                    )
                    await asyncio.sleep(delay)
        total = sum(s.length for s in segs)
        elapsed = loop.time() - started
        STATS.add(
            migrations=1,
            bytes=total,
            segments=len(segs),
            rounds=len(rounds),
            total_s=elapsed,
            stage_s=timings["stage_s"],
            read_s=timings["read_s"],
            scatter_s=timings["scatter_s"],
        )
        return {"bytes": total, "segments": len(segs), "rounds": len(rounds), "seconds": elapsed, **timings}

    async def _pull(self, rounds: list[list[Segment]], deadline: float) -> dict:
        loop = asyncio.get_running_loop()
        remote = self._remote
        assert remote is not None
        self._ensure_landing()
        timings = {"stage_s": 0.0, "read_s": 0.0, "scatter_s": 0.0}

        def left() -> float:
            rest = deadline - loop.time()
            if rest <= 0:
                raise MigrationError("kv migration deadline passed")
            return rest

        host, port = remote["control"]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), min(left(), self.settings.control_timeout_s)
        )
        try:
            await _send_frame(writer, {"op": "hello", "token": remote["token"]})
            reply = await asyncio.wait_for(_recv_frame(reader), min(left(), self.settings.control_timeout_s))
            if not reply.get("ok"):
                raise MigrationError(f"peer refused the link: {reply.get('error')}")
            for segs in rounds:
                t0 = loop.time()
                await _send_frame(
                    writer, {"op": "stage", "ranges": [[s.key, s.remote_offset, s.length] for s in segs]}
                )
                reply = await asyncio.wait_for(
                    _recv_frame(reader), min(left(), self.settings.control_timeout_s)
                )
                if not reply.get("ok"):
                    raise MigrationError(f"peer could not stage: {reply.get('error')}")
                nbytes = sum(s.length for s in segs)
                if reply.get("nbytes") != nbytes:
                    raise MigrationError(f"peer staged {reply.get('nbytes')} bytes, expected {nbytes}")
                self._import_staging(reply.get("staging"), nbytes)
                t1 = loop.time()
                await self._read(nbytes, deadline)
                t2 = loop.time()
                await asyncio.wait_for(loop.run_in_executor(self._pull_executor, self._scatter, segs), left())
                t3 = loop.time()
                timings["stage_s"] += t1 - t0
                timings["read_s"] += t2 - t1
                timings["scatter_s"] += t3 - t2
            await _send_frame(writer, {"op": "done"})
            await asyncio.wait_for(_recv_frame(reader), min(left(), self.settings.control_timeout_s))
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass
        return timings

    def _import_staging(self, mr: Any, nbytes: int) -> None:
        try:
            addr, length = int(mr["addr"]), int(mr["length"])
        except (KeyError, TypeError, ValueError):
            raise MigrationError("peer sent a malformed staging region") from None
        assert self._remote is not None
        if length < nbytes or length > self._remote["staging_bytes"] or addr <= 0:
            raise MigrationError(f"peer staging region of {length} bytes cannot hold {nbytes}")
        if self._remote_staging_handle is None or self._remote_staging_addr != addr:
            self._remote_staging_handle = self.endpoint.register_remote_memory_region(
                STAGING_NAME, {"name": STAGING_NAME, "addr": addr, "length": length}
            )
            self._remote_staging_addr = addr

    async def _read(self, nbytes: int, deadline: float) -> None:
        """DLSlime TCP reads of [0, nbytes) of the peer's staging into our landing buffer."""
        local_h, remote_h = self._landing_handle, self._remote_staging_handle
        assert local_h is not None and remote_h is not None
        calls = chunk_calls(nbytes, self.settings.chunk_bytes)
        in_flight: list[Any] = []
        try:
            for call in calls:
                while len(in_flight) >= MAX_CALLS_IN_FLIGHT:
                    await _await_future(in_flight.pop(0), deadline)
                in_flight.append(self.endpoint.read([(local_h, remote_h, off, off, n) for off, n in call]))
            while in_flight:
                await _await_future(in_flight.pop(0), deadline)
        except BaseException:
            if in_flight:
                self._retire_landing()
            raise

    def _scatter(self, segs: list[Segment]) -> None:
        with self._lock:
            regions = dict(self.regions)
        pairs, pos = [], 0
        for s in segs:
            r = regions[s.key]
            dst = byte_view(r.addr, r.length, r.device)[s.local_offset : s.local_offset + s.length]
            pairs.append((dst, self._landing[pos : pos + s.length]))
            pos += s.length
        assert self._pull_copier is not None
        self._pull_copier.copy(pairs)


async def _await_future(fut: Any, deadline: float) -> None:
    """Poll a DLSlime future without blocking the event loop (its wait() spins and may never return)."""
    loop = asyncio.get_running_loop()
    delay = 0.0002
    while True:
        status = fut.wait_for(0)
        if status is not None:
            if status != 0:
                raise MigrationError(f"DLSlime TCP read failed with status {status}")
            return
        if loop.time() >= deadline:
            raise MigrationError("kv migration deadline passed while reading")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.005)


def segments_from_lmdeploy(batch: Iterable[Any]) -> list[Segment]:
    """lmdeploy's AssignmentInstruct: target = the remote (prefill) offset, source = the local one."""
    out = []
    for a in batch:
        out.append(
            Segment(
                key=a.mr_key, remote_offset=a.target_offset, local_offset=a.source_offset, length=a.length
            )
        )
    return out
