"""What every command gets: the etcd connection (reached within the configured timeout), the key schema
of the chosen cluster and the output mode."""

from __future__ import annotations

import asyncio
import getpass
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from distserve.cluster.keys import Keys

from .errors import EXIT_UNAVAILABLE, CtlError
from .render import Output

# Interpreter start-up and exit, not measured by the clock that main() starts.
STARTUP_MARGIN_S = 0.3


@dataclass
class Ctx:
    cfg: Any  # discovery.config.EtcdConfig
    keys: Keys
    out: Output
    client: Any  # discovery.client.EtcdClient

    @property
    def timeout(self) -> float:
        return float(self.cfg.timeout)


def endpoints_text(cfg: Any) -> str:
    return ", ".join(str(e) for e in cfg.endpoints)


def unreachable(cfg: Any, detail: str | None = None) -> CtlError:
    tail = f" ({detail})" if detail else ""
    return CtlError(
        f"etcd unreachable: no answer from {endpoints_text(cfg)} within {float(cfg.timeout):g} s{tail}",
        EXIT_UNAVAILABLE,
    )


async def connect(cfg: Any, keys: Keys, started: float | None = None) -> Any:
    """A connected client that has answered one read, or CtlError(exit 2) before the timeout runs out.

    The timeout counts from `started` (when main() began), so `distserve-ctl` as a whole gives up within it."""
    from discovery.client import EtcdAuthError, EtcdClient, EtcdUnavailable  # here: grpc loads only when a command talks to etcd

    spent = time.monotonic() - started if started is not None else 0.0
    budget = max(0.5, float(cfg.timeout) - spent - STARTUP_MARGIN_S)
    client = EtcdClient(cfg)
    async def first_contact() -> None:
        await client.connect()
        # gRPC connects lazily: one cheap read proves an endpoint answers (and that auth works).
        await client.get(keys.config(), timeout=budget)

    try:
        # the client gives up at `budget` with what each endpoint said; the outer bound is a backstop
        await asyncio.wait_for(first_contact(), budget + 0.25)
    except (TimeoutError, asyncio.TimeoutError):
        await close_quietly(client)
        raise unreachable(cfg) from None
    except EtcdAuthError as exc:
        await close_quietly(client)
        raise CtlError(f"etcd at {endpoints_text(cfg)} refused the credentials: {_after_op(exc)}",
                       EXIT_UNAVAILABLE) from None
    except EtcdUnavailable as exc:
        await close_quietly(client)
        raise unreachable(cfg, _tried(exc)) from None
    except CtlError:
        await close_quietly(client)
        raise
    except Exception as exc:  # bad TLS material, ...: one line, not a traceback
        await close_quietly(client)
        raise CtlError(f"etcd at {endpoints_text(cfg)}: {describe_error(exc)}", EXIT_UNAVAILABLE) from None
    return client


def _tried(exc: BaseException) -> str | None:
    """The per-endpoint errors from an EtcdUnavailable message ("... (tried URL: error; ...)")."""
    text = one_line(exc)
    start = text.find("(tried ")
    if start < 0 or "no attempt finished" in text:
        return None
    tried = text[start + 1:].rstrip(")")
    # gRPC's wording around a refused connection says the same thing four times
    return re.sub(r"UNAVAILABLE: failed to connect to all addresses; last error: \w+: \S+?:\d+: "
                  r"(?:Failed to connect to remote host: )?", "", tried)


def _after_op(exc: BaseException) -> str:
    """"KV.Range: detail" -> "detail"."""
    text = one_line(exc)
    head, sep, tail = text.partition(": ")
    return tail if sep and "." in head and " " not in head else text


async def close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except Exception:  # noqa: BLE001 - closing is best effort on the way out
        pass


def describe_error(exc: BaseException) -> str:
    """One line for an exception, gRPC status errors included (their str() spans many lines)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            name = getattr(code(), "name", str(code()))
            return f"{name}: {one_line(details() or '')}".rstrip(": ")
        except Exception:  # noqa: BLE001
            pass
    return one_line(exc) or type(exc).__name__


def one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text[:400]


def operator_name() -> str:
    """Who wrote an operator flag: user@host (no secrets)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
