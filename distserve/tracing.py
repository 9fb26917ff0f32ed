"""OpenTelemetry tracing for the router and the engines, configured by the standard OTEL_* variables.

Off unless asked for: tracing starts only when the SDK is installed (`pip install 'distserve[otel]'`) and
OTEL_TRACES_EXPORTER names an exporter (`otlp`, `console`) or, when that is unset, an OTLP endpoint is set
(OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none keep it off. Everything else is the SDK's own reading of the environment:
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_EXPORTER_OTLP_*.

Callers check the module-level `ENABLED` once per request and touch nothing else when it is False: the
router's hot path then pays one attribute read (and the W3C pass-through of a client's `traceparent`, a
header lookup). The OpenTelemetry packages are imported only when tracing starts (cold start).

Spans are exported over OTLP/HTTP (protobuf) by the SDK's batch processor, on its own thread; `shutdown()`
flushes what is queued, off the event loop, and is called by the component's own stop().
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from distserve import __version__

log = logging.getLogger("distserve.tracing")

ENABLED = False  # read on hot paths: True once init() started a tracer provider

_provider = None
_tracer = None
_users = 0  # init() calls not yet matched by shutdown() (several engines may share one process)
_trace = None  # the opentelemetry.trace module, once enabled
_context = None  # opentelemetry.context
_propagator = None
_SERVER = _CLIENT = _INTERNAL = None
_ERROR = None

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACESTATE = re.compile(r"^[\x20-\x7e]{1,512}$")
_EXPORTERS = ("otlp", "console")


def requested(env: dict | os._Environ = os.environ) -> tuple[bool, str]:
    """Whether the OTEL_* variables ask for tracing, and why (for the log)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, "OTEL_SDK_DISABLED=true"
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters:
        if exporters == ["none"]:
            return False, "OTEL_TRACES_EXPORTER=none"
        return True, f"OTEL_TRACES_EXPORTER={','.join(exporters)}"
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if env.get(name, "").strip():
            return True, f"{name} is set"
    return False, "no OTEL_TRACES_EXPORTER or OTLP endpoint set"


def init(default_service: str, attributes: dict | None = None) -> bool:
    """Start tracing for this process when the environment asks for it; returns ENABLED.

    `default_service`: service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES set one.
    `attributes`: extra resource attributes (role, instance id). Each call is matched by one shutdown().
    """
    global ENABLED, _provider, _tracer, _users, _trace, _context, _propagator, _SERVER, _CLIENT, _INTERNAL, _ERROR
    _users += 1
    if ENABLED:
        return True
    wanted, why = requested()
    if not wanted:
        return False
    exporters = [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    unknown = [e for e in exporters if e not in _EXPORTERS and e != "none"]
    if unknown:
        log.warning("tracing off: OTEL_TRACES_EXPORTER names %s; this build exports with %s",
                    ", ".join(unknown), " or ".join(_EXPORTERS))
        return False
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if "otlp" in exporters and protocol and protocol.strip() != "http/protobuf":
        log.warning("tracing off: OTEL_EXPORTER_OTLP_PROTOCOL=%s; this build exports OTLP over http/protobuf only",
                    protocol.strip())
        return False
    try:  # OpenTelemetry is an optional extra (distserve[otel]): loaded only when tracing is asked for
        from opentelemetry import context, trace  # optional: distserve[otel]
        from opentelemetry.sdk.resources import Resource  # optional: distserve[otel]
        from opentelemetry.sdk.trace import TracerProvider  # optional: distserve[otel]
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # optional: distserve[otel]
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # optional: distserve[otel]
    except ImportError as exc:
        log.warning("tracing off: %s asks for it but the OpenTelemetry SDK is not installed "
                    "(pip install 'distserve[otel]'): %s", why, exc)
        return False
    attrs = dict(attributes or {})
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = default_service
    try:
        attrs.setdefault("service.version", __version__)
        provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)  # sampler: from env
        for name in exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # optional

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            elif name == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # optional, as above

                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    except ImportError as exc:
        log.warning("tracing off: the OTLP/HTTP exporter is not installed (pip install 'distserve[otel]'): %s", exc)
        return False
    except Exception as exc:  # noqa: BLE001 - a bad OTEL_* value must not stop the component
        log.warning("tracing off: the OTEL_* settings were rejected: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return False
    _trace, _context = trace, context
    _propagator = TraceContextTextMapPropagator()
    _SERVER, _CLIENT, _INTERNAL = trace.SpanKind.SERVER, trace.SpanKind.CLIENT, trace.SpanKind.INTERNAL
    _ERROR = trace.StatusCode.ERROR
    _provider = provider
    _tracer = provider.get_tracer("distserve")
    ENABLED = True
    log.info("tracing on (%s): service %s, sampler %s", why, provider.resource.attributes.get("service.name"),
             provider.sampler.get_description())
    return True


async def shutdown(timeout: float = 5.0) -> None:
    """Flush queued spans and stop exporting once the last init() caller is done (off the event loop)."""
    global ENABLED, _provider, _tracer, _users
    _users = max(0, _users - 1)
    if _users or _provider is None:
        return
    provider, _provider = _provider, None
    ENABLED = False
    _tracer = None
    try:
        # the SDK's shutdown blocks (a final export over HTTP): a thread, bounded
        await asyncio.wait_for(asyncio.to_thread(provider.shutdown), timeout)
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        log.warning("tracing: spans may be lost at shutdown: %s", exc or type(exc).__name__)


# ------------------------------------------------------------------ spans (call only when ENABLED)
def start_server_span(name: str, headers, attributes: dict | None = None):
    """A SERVER span whose parent is the caller's W3C traceparent (a new trace when absent or invalid)."""
    parent = _propagator.extract(headers)
    return _tracer.start_span(name, context=parent, kind=_SERVER, attributes=attributes)


def start_span(name: str, attributes: dict | None = None, kind: str = "internal", parent=None):
    """A span, child of `parent` (a span) or else of the current context's span."""
    ctx = _trace.set_span_in_context(parent) if parent is not None else None
    return _tracer.start_span(name, context=ctx, kind=_CLIENT if kind == "client" else _INTERNAL,
                              attributes=attributes)


def activate(span):
    """Make `span` current in this task (contextvars); returns the token for deactivate()."""
    return _context.attach(_trace.set_span_in_context(span))


def deactivate(token) -> None:
    _context.detach(token)


def current_span():
    """The current span, or None when tracing is off or none is recording."""
    if not ENABLED:
        return None
    span = _trace.get_current_span()
    return span if span.is_recording() else None


def traceparent(span) -> bytes:
    """`traceparent: ...` header line (CRLF included) naming `span` as the parent of the callee's spans."""
    sc = span.get_span_context()
    line = b"traceparent: 00-%032x-%016x-%02x\r\n" % (sc.trace_id, sc.span_id, sc.trace_flags)
    state = sc.trace_state
    if state:
        line += b"tracestate: " + state.to_header().encode() + b"\r\n"
    return line


def headers_for(span) -> dict[str, str]:
    """The same as a dict, for aiohttp clients."""
    sc = span.get_span_context()
    out = {"traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"}
    if sc.trace_state:
        out["tracestate"] = sc.trace_state.to_header()
    return out


def passthrough(headers) -> bytes:
    """Tracing off: the client's own traceparent/tracestate, passed on unchanged (W3C), when well formed."""
    tp = headers.get("traceparent")
    if tp is None or not _TRACEPARENT.match(tp):
        return b""
    line = b"traceparent: " + tp.encode() + b"\r\n"
    ts = headers.get("tracestate")
    if ts is not None and _TRACESTATE.match(ts):
        line += b"tracestate: " + ts.encode() + b"\r\n"
    return line


def fail(span, message: str, **attributes) -> None:
    """Mark `span` failed, with an `error` event carrying `attributes` (engine id, error kind)."""
    span.set_status(_ERROR, message[:500])
    span.add_event("error", {"message": message[:500], **attributes})


def end(span, status: int | None = None, error: str | None = None) -> None:
    """End `span`; an HTTP `status` is recorded, >= 500 (or `error`) marks it failed."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500 and error is None:
            error = f"HTTP {status}"
    if error is not None:
        span.set_status(_ERROR, error[:500])
    span.end()
