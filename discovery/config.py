"""How to reach etcd: endpoints, TLS, user/password, timeouts.

From code (`EtcdConfig(...)`), from `DISTSERVE_ETCD*` environment variables (`EtcdConfig.from_env()`), or
from command-line options (`EtcdConfig.add_arguments(parser)` + `EtcdConfig.from_args(args)`, options win
over environment variables). The password is a `SecretStr`: it never shows in a repr, a log or an error.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

ENV_ENDPOINTS = "DISTSERVE_ETCD_ENDPOINTS"
ENV_CA = "DISTSERVE_ETCD_CA"
ENV_CERT = "DISTSERVE_ETCD_CERT"
ENV_KEY = "DISTSERVE_ETCD_KEY"
ENV_USER = "DISTSERVE_ETCD_USER"
ENV_PASSWORD = "DISTSERVE_ETCD_PASSWORD"
ENV_TIMEOUT = "DISTSERVE_ETCD_TIMEOUT"

# A bound on one etcd call, retries included: beyond an hour a caller is hung, not patient.
MAX_TIMEOUT_S = 3600.0

ENDPOINT_FORM = "expected http(s)://host:port"
MAX_PEM_BYTES = 4 << 20  # a CA bundle, a certificate chain or a key: far smaller

# field -> (command-line option, environment variable): how an error names the value at fault
_SOURCES = {
    "endpoints": ("--etcd", ENV_ENDPOINTS), "ca_cert": ("--etcd-ca", ENV_CA), "cert": ("--etcd-cert", ENV_CERT),
    "key": ("--etcd-key", ENV_KEY), "user": ("--etcd-user", ENV_USER), "password": ("--etcd-password", ENV_PASSWORD),
    "timeout": ("--etcd-timeout", ENV_TIMEOUT),
}


class EtcdConfigError(ValueError):
    """Bad etcd settings from options or variables: one line naming the option or variable at fault
    (`invalid --etcd endpoint 'htp:/x': expected http(s)://host:port`); never echoes the password."""


@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL, split: `host:port` is what gRPC dials, `tls` says how."""

    url: str
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Accept `http://h:p`, `https://h:p` or a bare `h:p` (plain, unless a CA is configured).

    Errors read "endpoint 'TEXT': what is wrong", to follow "invalid --etcd" or the like."""
    raw = text.strip()
    if not raw:
        raise ValueError(f"empty endpoint: {ENDPOINT_FORM}")
    if "://" not in raw:
        raw = f"http://{raw}"
    try:
        parts = urlsplit(raw)
    except ValueError:  # an unbalanced IPv6 bracket
        raise ValueError(f"endpoint {text!r}: {ENDPOINT_FORM}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint {text!r}: {ENDPOINT_FORM} (the scheme must be http or https)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"endpoint {text!r}: {ENDPOINT_FORM}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"endpoint {text!r}: the port must be a number 1-65535") from None
    host = parts.hostname
    if not host or any(c.isspace() or c in "\\[]<>\"'`" for c in host):
        raise ValueError(f"endpoint {text!r}: {'missing' if not host else 'bad'} host; {ENDPOINT_FORM}")
    if port == 0:  # urlsplit accepts 0; nothing listens there
        raise ValueError(f"endpoint {text!r}: the port must be a number 1-65535")
    port = port or 2379
    return Endpoint(url=f"{parts.scheme}://{_host_for_url(host)}:{port}", host=host,
                    port=port, tls=parts.scheme == "https")


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class EtcdConfig(BaseModel):
    """Client settings. Files are paths to PEM files; `timeout` bounds every call, retries included."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoints: list[str] = Field(default_factory=lambda: [DEFAULT_ENDPOINT])  # at least one: _check_endpoints
    ca_cert: str | None = None  # CA bundle that signed the etcd server certificates (turns TLS on)
    cert: str | None = None  # client certificate (mutual TLS), needs `key`
    key: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    timeout: float = 5.0
    # Re-authenticate this often (etcd's simple tokens expire after --auth-token-ttl, 300 s by default);
    # an expired token is also refreshed on demand.
    token_refresh_interval: float = 120.0

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"no endpoints given: {ENDPOINT_FORM}")
        return [parse_endpoint(item).url for item in value]

    @field_validator("timeout", "token_refresh_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        # inf would wait forever and nan compares false everywhere: both are refused
        if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
            raise ValueError(f"must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}")
        return value

    @field_validator("ca_cert", "cert", "key")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        # checked here, not at the first connection: a typo is a bad argument, not "etcd unreachable"
        if value:
            path = Path(value)
            if not path.exists():
                raise ValueError("no such file")
            if not path.is_file():
                raise ValueError("not a file")
            if not os.access(path, os.R_OK):
                raise ValueError("not readable (permission denied)")
            if path.stat().st_size > MAX_PEM_BYTES or b"-----BEGIN " not in path.read_bytes():
                # else gRPC's only word for it is "Failed to create security handshaker", read as unreachable
                raise ValueError("not a PEM file (no -----BEGIN line)")
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> "EtcdConfig":
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both cert and key (--etcd-cert and --etcd-key, or "
                             f"{ENV_CERT} and {ENV_KEY})")
        if self.password is not None and not self.user:
            raise ValueError(f"a password needs a user (--etcd-user or {ENV_USER})")
        if self.cert and not self.tls:
            # a plain-text connection would silently never present it
            raise ValueError(f"a client certificate needs TLS: https:// endpoints or a CA (--etcd-ca or {ENV_CA})")
        return self

    # --- derived -------------------------------------------------------------------------------------
    @property
    def parsed_endpoints(self) -> list[Endpoint]:
        return [parse_endpoint(url) for url in self.endpoints]

    @property
    def tls(self) -> bool:
        """TLS is on when a CA is given or any endpoint says https."""
        return bool(self.ca_cert) or any(ep.tls for ep in self.parsed_endpoints)

    def read_tls_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(ca, key, cert) PEM bytes; the CA may be None (system roots) when only https is given."""

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return read(self.ca_cert), read(self.key), read(self.cert)

    def describe(self) -> str:
        """A one-line summary safe for logs (never the password)."""
        auth = f" user={self.user}" if self.user else ""
        tls = " tls" if self.tls else ""
        mtls = "+client-cert" if self.cert else ""
        return f"etcd {','.join(self.endpoints)}{tls}{mtls}{auth} timeout={self.timeout}s"

    # --- environment and command line ----------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, _from_options: bool = False,
                 **overrides: object) -> "EtcdConfig":
        """Read DISTSERVE_ETCD_ENDPOINTS (comma list), _CA, _CERT, _KEY, _USER, _PASSWORD, _TIMEOUT.

        Raises EtcdConfigError (a ValueError) whose message names the variable (or option) at fault."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        mapping = {
            "endpoints": ENV_ENDPOINTS, "ca_cert": ENV_CA, "cert": ENV_CERT, "key": ENV_KEY,
            "user": ENV_USER, "password": ENV_PASSWORD, "timeout": ENV_TIMEOUT,
        }
        for field, var in mapping.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[field] = raw.strip() if field != "password" else raw
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        labels = {field: mapping[field] for field in values if field in mapping and field not in given}
        labels.update({field: _SOURCES[field][0] if _from_options else field for field in given if field in _SOURCES})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise EtcdConfigError(_one_line(exc, labels)) from None

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("etcd", "where the cluster state lives (each also from DISTSERVE_ETCD_*)")
        group.add_argument("--etcd", dest="etcd_endpoints", metavar="ENDPOINTS",
                           help=f"comma-separated etcd client URLs (env {ENV_ENDPOINTS}; default {DEFAULT_ENDPOINT})")
        group.add_argument("--etcd-ca", dest="etcd_ca", metavar="FILE", help=f"CA bundle, turns TLS on (env {ENV_CA})")
        group.add_argument("--etcd-cert", dest="etcd_cert", metavar="FILE", help=f"client certificate (env {ENV_CERT})")
        group.add_argument("--etcd-key", dest="etcd_key", metavar="FILE", help=f"client key (env {ENV_KEY})")
        group.add_argument("--etcd-user", dest="etcd_user", metavar="USER", help=f"etcd user (env {ENV_USER})")
        group.add_argument("--etcd-password", dest="etcd_password", metavar="PASSWORD",
                           help=f"etcd password; prefer env {ENV_PASSWORD} (command lines are visible to ps)")
        group.add_argument("--etcd-timeout", dest="etcd_timeout", metavar="SECONDS", type=float,
                           help=f"bound on every etcd call, retries included (env {ENV_TIMEOUT}; default 5)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "EtcdConfig":
        """Options from add_arguments(); each one given wins over its environment variable.

        Raises EtcdConfigError: one line naming the option (or variable) at fault, for the CLI to print."""
        return cls.from_env(
            environ,
            _from_options=True,
            endpoints=getattr(args, "etcd_endpoints", None),
            ca_cert=getattr(args, "etcd_ca", None),
            cert=getattr(args, "etcd_cert", None),
            key=getattr(args, "etcd_key", None),
            user=getattr(args, "etcd_user", None),
            password=getattr(args, "etcd_password", None),
            timeout=getattr(args, "etcd_timeout", None),
        )


def _one_line(exc: ValidationError, labels: Mapping[str, str]) -> str:
    """"invalid --etcd-timeout -1.0: must be ..." for each error, joined; never the password's value."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else ""
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if not field:  # a rule across fields: its message names them
            parts.append(msg)
            continue
        label = labels.get(field, field)
        if field == "endpoints" and msg.startswith("endpoint "):  # the message names the endpoint
            parts.append(f"invalid {label} {msg}")
        elif field in ("endpoints", "password"):
            parts.append(f"invalid {label}: {msg}")
        else:
            parts.append(f"invalid {label} {err.get('input')!r}: {msg}")
    return "; ".join(parts) or "invalid etcd configuration"


def config_error_message(exc: Exception) -> str:
    """One line for a CLI from an EtcdConfigError or a pydantic ValidationError (never echoes the password)."""
    if isinstance(exc, EtcdConfigError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return _one_line(exc, {"endpoints": "etcd"})
    return f"invalid etcd configuration: {exc}"
