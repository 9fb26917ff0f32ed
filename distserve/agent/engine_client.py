"""HTTP calls from an agent to engines, over the engine protocol only (docs: shared notes engine-protocol.md).

Everything an agent knows about an engine comes through here, so a stock lmdeploy api_server and the
reference engine are handled by the same code. One aiohttp session per agent is shared by every engine
client; every call has a timeout; errors are `EngineError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import BaseModel, ValidationError

from distserve.protocol import (
    ConnectRequest,
    ConnectResponse,
    DistServeEngineConfig,
    DropConnectRequest,
    InitRequest,
    InitResponse,
    parse_engine_info,
)


class EngineError(Exception):
    """An engine call failed. `refused`: nothing listens on the port (the process is gone)."""

    def __init__(self, message: str, *, status: int | None = None, refused: bool = False, timeout: bool = False):
        super().__init__(message)
        self.status = status
        self.refused = refused
        self.timeout = timeout


@dataclass
class EngineFacts:
    """What /distserve/engine_info, /v1/models and /metrics say about an engine, once."""

    config: DistServeEngineConfig
    extras: dict[str, Any]  # engine_info fields beyond lmdeploy's (reference engine: instance_id, kv_layout, ...)
    models: list[str]
    metrics: dict[str, float] | None = None  # None when /metrics is absent

    @property
    def instance_id(self) -> str | None:
        return instance_from(self.extras, self.metrics)


def instance_from(extras: dict[str, Any], metrics: dict[str, float] | None) -> str | None:
    """The engine process's own identity, when it exposes one: the reference engine's `instance_id`, else the
    process start time that prometheus_client's process collector exports (lmdeploy --enable-metrics)."""
    value = extras.get("instance_id")
    if value:
        return str(value)
    start = (metrics or {}).get("process_start_time_seconds")
    if start:
        return f"pst-{start:.2f}"
    return None


@dataclass
class Metrics:
    """Parsed Prometheus text: metric name -> sum over its label sets."""

    values: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        values: dict[str, float] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            brace, space = line.find("{"), line.find(" ")
            if brace != -1 and (space == -1 or brace < space):  # name{labels} value [timestamp]
                name_part = line[:brace]
                tail = line[brace:].rpartition("}")[2]
            else:  # name value [timestamp]
                name_part, _, tail = line.partition(" ")
            fields = tail.split()
            if not fields:
                continue
            try:
                value = float(fields[0])
            except ValueError:
                continue
            if math.isnan(value):
                continue
            values[name_part] = values.get(name_part, 0.0) + value
        return cls(values)


class EngineClient:
    """Calls to one engine (by URL) over the agent's shared session."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str | None = None,
                 timeout: float = 5.0) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _request(self, method: str, path: str, *, body: Any = None, timeout: float | None = None,
                       accept_404: bool = False) -> tuple[int, str]:
        limit = aiohttp.ClientTimeout(total=timeout or self.timeout)
        try:
            async with self.session.request(method, self.url + path, json=body, headers=self._headers,
                                            timeout=limit) as resp:
                text = await resp.text()
                if resp.status == 404 and accept_404:
                    return resp.status, text
                if resp.status >= 400:
                    raise EngineError(f"{method} {self.url}{path}: HTTP {resp.status}: {_snippet(text)}",
                                      status=resp.status)
                return resp.status, text
        except EngineError:
            raise
        except asyncio.TimeoutError:
            raise EngineError(f"{method} {self.url}{path}: no answer within {timeout or self.timeout:g}s",
                              timeout=True) from None
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            raise EngineError(f"{method} {self.url}{path}: {'connection refused' if refused else exc}",
                              refused=refused) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None

    async def _json(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        _, text = await self._request(method, path, body=body, timeout=timeout)
        try:
            return json.loads(text)
        except ValueError:
            raise EngineError(f"{method} {self.url}{path}: answer is not JSON: {_snippet(text)}") from None

    async def health(self, timeout: float | None = None) -> None:
        """Raises EngineError unless GET /health answers 2xx."""
        await self._request("GET", "/health", timeout=timeout)

    async def engine_info(self, timeout: float | None = None) -> tuple[DistServeEngineConfig, dict[str, Any]]:
        body = await self._json("GET", "/distserve/engine_info", timeout=timeout)
        try:
            config = parse_engine_info(body)
        except (ValidationError, ValueError) as exc:
            raise EngineError(f"GET {self.url}/distserve/engine_info: unexpected answer: {_first_line(exc)}") from None
        return config, dict(config.model_extra or {})

    async def models(self, timeout: float | None = None) -> list[str]:
        body = await self._json("GET", "/v1/models", timeout=timeout)
        try:
            return [str(item["id"]) for item in body["data"]]
        except (KeyError, TypeError):
            raise EngineError(f"GET {self.url}/v1/models: not an OpenAI model list") from None

    async def metrics(self, timeout: float | None = None) -> dict[str, float] | None:
        """Prometheus gauges summed over labels; None when the engine has no /metrics."""
        status, text = await self._request("GET", "/metrics", timeout=timeout, accept_404=True)
        if status == 404:
            return None
        return Metrics.parse(text).values

    async def facts(self, timeout: float | None = None) -> EngineFacts:
        config, extras = await self.engine_info(timeout)
        models = await self.models(timeout)
        metrics = await self.metrics(timeout)
        return EngineFacts(config=config, extras=extras, models=models, metrics=metrics)

    async def p2p_initialize(self, request: InitRequest, timeout: float | None = None) -> InitResponse:
        return await self._typed("/distserve/p2p_initialize", request, InitResponse, timeout)

    async def p2p_connect(self, request: ConnectRequest, timeout: float | None = None) -> ConnectResponse:
        return await self._typed("/distserve/p2p_connect", request, ConnectResponse, timeout)

    async def p2p_drop_connect(self, request: DropConnectRequest, timeout: float | None = None) -> None:
        await self._request("POST", "/distserve/p2p_drop_connect", body=_wire(request), timeout=timeout)

    async def _typed(self, path: str, request: BaseModel, answer: type[BaseModel], timeout: float | None) -> Any:
        body = await self._json("POST", path, _wire(request), timeout)
        try:
            return answer.model_validate(body)
        except ValidationError as exc:
            raise EngineError(f"POST {self.url}{path}: unexpected answer: {_first_line(exc)}") from None


def _wire(model: BaseModel) -> Any:
    """lmdeploy wants its enums as integers (IntEnum dumps as int in JSON mode)."""
    return model.model_dump(mode="json", exclude_none=True)


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[:2]) if lines else type(exc).__name__
