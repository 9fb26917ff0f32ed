"""OpenAI-style errors: `{"error": {"message", "type", "code", "param"}}` with the right HTTP status."""

from __future__ import annotations

import orjson
from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error the router answers to its client (never a 200 carrying an error)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers
        # the connection cannot be reused (a body left half-read): answer, then close it at once
        self.close = close

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def sse_event(self) -> bytes:
        """The event that ends a stream which failed after it started."""
        return b"data: " + self.body() + b"\n\n"

    def response(self, request_id: str | None = None) -> web.Response:
        headers = dict(self.headers or {})
        if request_id:
            headers["X-Request-Id"] = request_id
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=headers
        )
