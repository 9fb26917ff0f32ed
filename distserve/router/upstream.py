"""How engine calls fail, and what the client is told.

Engine calls go through distserve.router.http1 (pooled keep-alive connections) and carry the cluster
token (`Authorization: Bearer`) and the request id. A failure becomes an `UpstreamError` whose `kind`
says what the caller may do about it:

| kind       | meaning                                            | retry elsewhere | trips the breaker |
| ---------- | -------------------------------------------------- | --------------- | ----------------- |
| connect    | connection refused / unreachable                   | yes             | yes               |
| disconnect | connection dropped before an answer                | yes             | no                |
| status     | an HTTP error status (5xx, 404, 401/403, 429)      | yes             | no                |
| client     | a 4xx caused by the client's request (400/413/422) | no              | no                |
| timeout    | the phase timed out                                | no              | no                |
| answer     | a 200 whose body is not what the protocol promises | no              | no                |
"""

from __future__ import annotations

import asyncio

import orjson

from distserve.router.errors import ApiError

CLIENT_STATUSES = frozenset({400, 413, 422})


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None, body: bytes | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.kind in ("connect", "disconnect", "status")

    def to_api_error(self, phase: str) -> ApiError:
        """The error the client sees once retries are exhausted (or not allowed)."""
        if self.kind == "client":
            return _client_error(self.status or 400, self.body, self.message)
        if self.kind == "timeout":
            return ApiError(504, f"{phase} timed out: {self.message}", f"{phase}_timeout")
        if self.kind == "status" and self.status == 429:
            return ApiError(
                429,
                f"{phase} engines are overloaded: {self.message}",
                "engine_overloaded",
                headers={"Retry-After": "1"},
            )
        return ApiError(502, f"{phase} failed: {self.message}", f"{phase}_failed")


def _client_error(status: int, body: bytes | None, fallback: str) -> ApiError:
    """An engine's 4xx about the client's request, passed on with the engine's own message."""
    status = 400 if status == 422 else status
    message, code, param = fallback, "invalid_request", None
    try:
        err = orjson.loads(body or b"")
        if isinstance(err, dict) and isinstance(err.get("error"), dict):
            err = err["error"]
            message = str(err.get("message") or message)
            code = str(err.get("code") or code)
            param = err.get("param") if isinstance(err.get("param"), str) else None
        elif isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
    except orjson.JSONDecodeError:
        pass
    return ApiError(status, message, code, param)


def classify_status(status: int, body: bytes) -> UpstreamError:
    snippet = body[:300].decode(errors="replace").strip()
    if status in CLIENT_STATUSES:
        return UpstreamError("client", f"HTTP {status}: {snippet}", status, body)
    if status in (401, 403):
        return UpstreamError(
            "status", f"HTTP {status}: the engine rejected the router's cluster token", status, body
        )
    return UpstreamError("status", f"HTTP {status}: {snippet}", status, body)


def classify_exception(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamError("timeout", str(exc) or "no answer in time")
    if isinstance(exc, (ConnectionRefusedError, ConnectionAbortedError)):
        return UpstreamError("connect", str(exc))
    return UpstreamError("disconnect", f"{type(exc).__name__}: {exc}")
