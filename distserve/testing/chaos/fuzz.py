"""Property-based fuzzing of the router's HTTP API with hypothesis (runs in a thread, plain http.client).

What is drawn: valid requests with odd parameter values (they reach the engines), valid requests with
exactly one thing wrong, request bodies that are almost valid (each field either valid or any JSON value, extra and
internal fields, nested junk), raw bytes (broken JSON, non-UTF-8, deep nesting, huge numbers), every route
with every method plus unknown paths, and odd headers (content types, auth, request ids, lengths).
The property: no answer is a 5xx and no connection is dropped. Every example is kept (no shrinking:
`run_fuzz` collects, it does not stop at the first counter-example).
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/health/ready", "/metrics"]
INTERNAL = ["migration_request", "with_cache", "preserve_cache", "session_id", "remote_session_id",
            "cache_block_ids", "remote_token_ids", "is_dummy_prefill"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4)), max_leaves=12)


def maybe(valid):
    """A field's value: usually valid, sometimes any JSON value, sometimes absent."""
    return st.one_of(valid, valid, json_values, st.just(KeyError))


def request_body(model: str):
    message = st.fixed_dictionaries({}, optional={
        "role": st.one_of(st.sampled_from(["user", "system", "assistant", "robot"]), json_values),
        "content": st.one_of(st.text(max_size=60), st.text(max_size=60), json_values)})
    fields = {
        "model": maybe(st.sampled_from([model, model, "no-such-model", ""])),
        "prompt": maybe(st.one_of(st.text(max_size=80), st.lists(st.text(max_size=20), max_size=3),
                                  st.lists(st.integers(0, 300), max_size=8))),
        "messages": maybe(st.lists(message, max_size=3)),
        "max_tokens": maybe(st.one_of(st.integers(1, 16), st.integers(-5, 0), st.integers(5000, 2 ** 40))),
        "temperature": maybe(st.floats(-1, 3, allow_nan=False)),
        "top_p": maybe(st.floats(-0.5, 1.5, allow_nan=False)),
        "n": maybe(st.integers(-1, 3)),
        "stream": maybe(st.booleans()),
        "stop": maybe(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6))),
        "seed": maybe(st.integers(-(2 ** 65), 2 ** 65)),
        "logprobs": maybe(st.one_of(st.booleans(), st.integers(-1, 30))),
        "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "ignore_eos": maybe(st.booleans()),
        "max_completion_tokens": maybe(st.integers(-2, 16)),
    }

    @st.composite
    def build(draw):
        body = {}
        for name, strategy in fields.items():
            if name == "max_tokens" or draw(st.booleans()):  # see valid_body: keep answers short
                value = draw(strategy)
                if value is not KeyError:
                    body[name] = value
                elif name == "max_tokens":
                    body[name] = 8
        for _ in range(draw(st.integers(0, 2))):
            body[draw(st.one_of(st.sampled_from(INTERNAL), st.text(max_size=12)))] = draw(json_values)
        return body

    return build()


def valid_body(model: str, route: str):
    """A request the API accepts, with odd but valid parameter values (what reaches the engines)."""
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)
    # max_tokens is always there and small: without it a chat answer may run to the context length
    optional = {
        # the range's edges and the smallest floats are always tried (5e-324 once broke sampling)
        "temperature": st.one_of(st.sampled_from([0.0, 5e-324, 1e-300, 1e-9, 2.0]), st.floats(0, 2, allow_nan=False)),
        "top_p": st.one_of(st.sampled_from([5e-324, 1e-9, 1.0]), st.floats(0.01, 1, allow_nan=False)),
        "top_k": st.integers(1, 50),
        "stream": st.booleans(),
        "stop": st.one_of(text.map(lambda t: t[:4]), st.lists(text.map(lambda t: t[:4]), min_size=1, max_size=4)),
        "seed": st.integers(0, 2 ** 31),
        "ignore_eos": st.booleans(),
        "n": st.just(1),
        "presence_penalty": st.floats(-2, 2, allow_nan=False),
        "frequency_penalty": st.floats(-2, 2, allow_nan=False),
        "repetition_penalty": st.floats(0.5, 2, allow_nan=False),
        "user": text,
    }
    if route.endswith("chat/completions"):
        content = {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                               "content": text}), min_size=1, max_size=3)}
    else:
        content = {"prompt": st.one_of(text, st.lists(st.integers(1, 200), min_size=1, max_size=12))}
    return st.fixed_dictionaries({"model": st.just(model), "max_tokens": st.integers(1, 12), **content},
                                 optional=optional)


@st.composite
def mutated_body(draw, model: str, route: str):
    """A valid request with exactly one thing wrong (a field of the wrong type or out of range, a missing
    field, an internal field, an unknown field)."""
    body = dict(draw(valid_body(model, route)))
    how = draw(st.sampled_from(["retype", "drop", "internal", "unknown", "model"]))
    if how == "retype":
        body[draw(st.sampled_from(sorted(body) + ["max_tokens", "temperature", "stream", "stop", "n"]))] = \
            draw(json_values)
    elif how == "drop":
        body.pop(draw(st.sampled_from(sorted(set(body) - {"max_tokens"}))))
    elif how == "internal":
        body[draw(st.sampled_from(INTERNAL))] = draw(json_values)
    elif how == "unknown":
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    else:
        body["model"] = draw(st.one_of(st.just(""), st.text(max_size=20), st.just("x" * 600)))
    return body


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b"{", b"}", b"[]", b"null", b"1e999999", b'{"model": 1e999}', b"\xff\xfe",
                     b'{"model": "chaos-tiny", "prompt": "x", "max_tokens": 99999999999999999999999}',
                     b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
                     b'{"model": "chaos-tiny", "prompt": "\\ud800"}']),
)

headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x",
                                     "application/json; charset=latin-1", ""]),
    "Authorization": st.sampled_from(["Bearer", "Bearer x", "Basic abc", "Bearer " + "k" * 500]),
    "X-Request-Id": st.one_of(st.text(alphabet="abc-_.:", max_size=200), st.sampled_from(["\t", "a b", "é"])),
    "Accept": st.sampled_from(["text/event-stream", "*/*", "application/xml"]),
})


def run_fuzz(router_urls: list[str], model: str, examples: int) -> dict:
    """Send `examples` drawn requests of each kind, spread over the routers; returns what came back."""
    statuses: Counter = Counter()
    server_errors: list[str] = []
    transport_errors: list[str] = []
    counter = {"n": 0}
    targets = [urlsplit(u) for u in router_urls]

    def send(method: str, path: str, body: bytes | None, hdrs: dict) -> None:
        target = targets[counter["n"] % len(targets)]
        counter["n"] += 1
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            safe = {k: v for k, v in hdrs.items() if all(0x20 <= ord(c) < 0x7f for c in v)}
            conn.request(method, path, body=body, headers=safe)
            resp = conn.getresponse()
            payload = resp.read()
            statuses[resp.status] += 1
            if resp.status >= 500:
                server_errors.append(f"{method} {path} {body[:120]!r} -> {resp.status} {payload[:200]!r}")
            elif resp.status == 200 and b'"error"' in payload[:200] and path.startswith("/v1/") and \
                    b"data:" not in payload[:10]:
                server_errors.append(f"{method} {path} {body[:120]!r} -> 200 carrying an error {payload[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            transport_errors.append(f"{method} {path} {(body or b'')[:120]!r}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    common = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=request_body(model),
           hdrs=headers)
    def bodies(route, body, hdrs):
        send("POST", route, json.dumps(body).encode(), {"Content-Type": "application/json", **hdrs})

    @common
    @given(data=st.data(), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def valid(data, route):
        body = data.draw(valid_body(model, route))
        send("POST", route, json.dumps(body).encode(), {"Content-Type": "application/json"})

    @common
    @given(data=st.data(), route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def mutated(data, route):
        body = data.draw(mutated_body(model, route))
        send("POST", route, json.dumps(body).encode(), {"Content-Type": "application/json"})

    @common
    @given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=raw_bodies, hdrs=headers)
    def raw(route, raw, hdrs):
        send("POST", route, raw, hdrs)

    @settings(max_examples=max(20, examples // 5), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
           path=st.one_of(st.sampled_from(ROUTES + ["/distserve/free_cache", "/distserve/p2p_initialize",
                                                    "/v1", "/", "//v1//completions", "/v1/completions/"]),
                          st.text(alphabet="/abcv1._-%", max_size=30).map(lambda p: "/" + p)),
           body=st.one_of(st.none(), raw_bodies))
    def paths(method, path, body):
        send(method, path, body, {"Content-Type": "application/json"})

    valid()
    mutated()
    bodies()
    raw()
    paths()
    return {"requests": counter["n"], "statuses": dict(sorted(statuses.items())),
            "server_errors": server_errors, "transport_errors": transport_errors}
