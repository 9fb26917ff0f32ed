"""deploy/grafana, deploy/prometheus and the KEDA example, checked against the real thing: promtool on the
rules, every metric they name found in a live scrape of a router, engines and etcd (a renamed metric fails
here, not on a dashboard), and, where Debian's `prometheus` is installed (tools/setup), a real Prometheus
scraping that live cluster evaluates every dashboard query, alert expression and KEDA query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid

import jsonschema
import openai
import pytest
import yaml
from kubernetes_validate import utils as k8s_schema

from discovery.embedded import EmbeddedEtcd
from distserve.testing import metrics as prom
from tests.router.cluster import MODEL, router_metric, start_null_engines, start_router, wait_links_usable
from tests.util import REPO, Proc, free_port, wait_http

DASHBOARD = REPO / "deploy" / "grafana" / "distserve.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
PROM_EXAMPLE = REPO / "deploy" / "prometheus" / "prometheus.yml"
KEDA = REPO / "deploy" / "kubernetes" / "autoscaling" / "keda-scaledobjects.yaml"
CLUSTER_LABEL = "obs"  # the `cluster` target label the test's Prometheus adds
NAME_RE = re.compile(r"\b((?:distserve|etcd)_[a-zA-Z0-9_]+)")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NO_PROMETHEUS = "Debian's `prometheus` package is not installed (tools/setup installs it where apt can)"


# ------------------------------------------------------------------------------------------ the artefacts
def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def keda_objects() -> list[dict]:
    return [d for d in yaml.safe_load_all(KEDA.read_text()) if d]


def keda_queries() -> list[str]:
    return [t["metadata"]["query"] for d in keda_objects() for t in d["spec"]["triggers"]]


def all_exprs() -> list[str]:
    return dashboard_exprs() + [r["expr"] for r in alert_rules()] + keda_queries()


def concrete(expr: str) -> str:
    """A dashboard query as Grafana sends it, for this test's Prometheus (1 s scrapes)."""
    return (expr.replace("$cluster", CLUSTER_LABEL).replace("$__rate_interval", "15s")
            .replace("$__range", "5m"))


def parse_exposition(text: str) -> tuple[dict[str, str], set[str]]:
    """({family: type}, {sample names}) of Prometheus text."""
    families: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            families[name] = kind.strip()
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return families, samples


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The metric family a PromQL name belongs to (histogram/summary series carry suffixes)."""
    if name in families:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and families.get(base) in ("histogram", "summary"):
            return base
    return None


# --------------------------------------------------------------------------------------- offline checks
def test_dashboard_is_templated_by_datasource_and_cluster():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["cluster"]["includeAll"] and variables["cluster"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # every selector is filtered by the cluster variable (no panel mixes clusters)
            for m in NAME_RE.finditer(target["expr"]):
                rest = target["expr"][m.end():]
                assert rest.startswith("{") and 'cluster=~"$cluster"' in rest[: rest.index("}")], (
                    f"{panel['title']}: {m.group(1)} is not filtered by $cluster")
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("requests per second", "failed engine calls", "time to first token", "per phase",
                  "migration bandwidth", "kv cache use", "links", "view lag", "etcd", "prefill queue"):
        assert topic in titles, topic


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_checks_the_rules_their_unit_tests_and_the_example_config():
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)],
                 ["check", "config", str(PROM_EXAMPLE)]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"


def test_alerts_cover_the_failure_modes_and_carry_severity_and_summary():
    rules = {r["alert"]: r for r in alert_rules()}
    for name in ("DistserveModelUnroutable", "DistserveRouterViewLagging", "DistserveRouterViewBehind",
                 "DistserveLinkFailures", "DistserveEngineLeaseLost", "DistserveEngineFlapping",
                 "DistserveErrorBudgetBurnFast", "DistserveTTFTBudgetBurnFast", "DistserveEtcdNoLeader"):
        assert name in rules, name
    ops = (REPO / "docs" / "operations.md").read_text()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        assert f"`{name}" in ops or f"`{name.removesuffix('Slow')}Fast` / `Slow`" in ops, f"{name} undocumented"


# KEDA's ScaledObject (keda.sh/v1alpha1) as documented at keda.sh/docs/2.x/reference/scaledobject-spec and
# .../scalers/prometheus: kubernetes-validate has no CRD schemas, so the structure is checked against this
# (unknown fields fail, like the strict Kubernetes validation of the other manifests).
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
KEDA_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "namespace": {"type": "string"}, "labels": {"type": "object"}, "annotations": {"type": "object"}},
            "additionalProperties": False},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object", "additionalProperties": False,
                             "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": {"type": "integer", "minimum": 1},
                                            "replicas": {"type": "integer", "minimum": 0}}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": {"type": "object"}}},
                    "scalingModifiers": {"type": "object"}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "prometheus"},  # the only scaler this example uses
                        "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        "authenticationRef": {"type": "object"},
                        "metadata": {"type": "object", "additionalProperties": False,
                                     "required": ["serverAddress", "query", "threshold"],
                                     "properties": {
                                         "serverAddress": {"type": "string", "pattern": r"^https?://"},
                                         "query": {"type": "string", "minLength": 1},
                                         "threshold": _QUANTITY, "activationThreshold": _QUANTITY,
                                         "namespace": {"type": "string"}, "authModes": {"type": "string"},
                                         "ignoreNullValues": {"type": "string"},
                                         "unsafeSsl": {"type": "string"}, "customHeaders": {"type": "string"},
                                         "queryParameters": {"type": "string"}}}}}},
            },
        },
    },
}


def test_keda_scaledobjects_are_well_formed_and_target_the_pools():
    objects = keda_objects()
    kust = yaml.safe_load((REPO / "deploy" / "kubernetes" / "kustomization.yaml").read_text())
    statefulsets = {
        d["metadata"]["name"]
        for f in ("prefill.yaml", "decode.yaml")
        for d in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / f).read_text())
        if d and d["kind"] == "StatefulSet"
    }
    targets = set()
    for obj in objects:
        jsonschema.validate(obj, KEDA_SCHEMA)
        spec = obj["spec"]
        assert obj["metadata"]["namespace"] == kust["namespace"]
        ref = spec["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "StatefulSet") and ref["name"] in statefulsets
        targets.add(ref["name"])
        assert 0 < spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # the HPA behaviour KEDA passes through is validated by the Kubernetes schema itself
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": ref["name"]},
                        "maxReplicas": spec["maxReplicaCount"],
                        "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]}}
        k8s_schema.validate(hpa, "1.30.0", strict=True)
    assert targets == {"prefill", "decode"}  # the two pools scale apart
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        bad = json.loads(json.dumps(objects[0]))
        bad["spec"]["triggers"][0]["metadata"]["treshold"] = bad["spec"]["triggers"][0]["metadata"].pop("threshold")
        jsonschema.validate(bad, KEDA_SCHEMA)


# ------------------------------------------------------------------------------------------ live cluster
def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """etcd, a router started first (so it sees the engines register), a null prefill and a null decode
    with their in-process agents, a few requests (a stream and a 404 among them)."""
    etcd = EmbeddedEtcd(unsafe_no_fsync=True).start()
    name = f"obs{uuid.uuid4().hex[:6]}"
    procs: list[Proc] = []
    try:
        rp, router = start_router(etcd.endpoints, "--cluster", name, wait_ready=False)
        procs.append(rp)
        wait_http(f"{router}/health", timeout=60)
        time.sleep(1.0)  # the router lists (and syncs) an empty view before the engines register
        engines = []
        for role in ("prefill", "decode"):
            proc, urls = start_null_engines(role, 1, "--etcd", ",".join(etcd.endpoints), "--cluster", name,
                                            "--ttl", "3")
            procs.append(proc)
            engines += urls
        wait_links_usable(router, log=procs[-1])
        client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
        for _ in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True):
            pass
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        yield {"router": router, "engines": engines, "etcd": etcd.client_url, "send": client,
               "decode_proc": procs[-1]}
    finally:
        for proc in procs:
            proc.kill()
        etcd.stop()


def test_every_metric_named_by_dashboard_alerts_and_keda_is_exported(live):
    families: dict[str, str] = {}
    samples: set[str] = set()
    for url in (live["router"], *live["engines"], live["etcd"]):
        f, s = parse_exposition(scrape(url))
        families.update(f)
        samples |= s
    names = {m for expr in all_exprs() for m in NAME_RE.findall(expr)}
    assert len(names) > 30
    missing = sorted(n for n in names if family_of(n, families) is None and n not in samples)
    assert not missing, f"named by deploy/ but exported by no router, engine or etcd: {missing}"
    # the lifecycle counter saw both engines register after the router synced
    text = scrape(live["router"])
    assert any(n == "distserve_router_engine_changes_total" and lab.get("change") == "registered" and v == 1
               for n, lab, v in prom.samples(text)), text
    assert prom.find(text, "distserve_router_model_routable", {"model": MODEL}) == 1


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", (path, body)
        return body["data"]

    def __call__(self, expr: str) -> list:
        """An instant query's result (a PromQL error fails the test)."""
        return self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["result"]


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    work = tmp_path_factory.mktemp("prom")
    port = free_port()
    hostport = lambda url: urllib.parse.urlsplit(url).netloc  # noqa: E731
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets, "labels": {"cluster": CLUSTER_LABEL}}]}
            for job, targets in (("distserve-router", [hostport(live["router"])]),
                                 ("distserve-engine", [hostport(u) for u in live["engines"]]),
                                 ("etcd", [hostport(live["etcd"])]))
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = Proc([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], name="prometheus")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", timeout=30)

        query = Prometheus(url)
        deadline = time.monotonic() + 30
        while len(query("up == 1")) < 4 or not query('count_over_time(up{job="etcd"}[1m]) >= 4'):
            assert time.monotonic() < deadline, f"targets not scraped: {query('up')}\n{proc.output()[-2000:]}"
            time.sleep(0.5)
        # traffic between scrapes, so rates and histogram quantiles have something to show
        for _ in range(3):
            live["send"].completions.create(model=MODEL, prompt="again", max_tokens=4)
            time.sleep(1.1)
        yield query
    finally:
        proc.kill()


def sparse_in_scrape(live) -> set[str]:
    """Families exported with no sample yet (event counters born at their first event: retries, errors)."""
    families: dict[str, str] = {}
    samples: set[str] = set()
    for u in (live["router"], *live["engines"], live["etcd"]):
        f, s = parse_exposition(scrape(u))
        families.update(f)
        samples |= s
    return {f for f in families if not any(family_of(s, families) == f for s in samples)}


def test_every_dashboard_and_keda_query_returns_data_from_a_real_prometheus(live, prometheus):
    sparse = sparse_in_scrape(live)
    empty = []
    for expr in dashboard_exprs() + keda_queries():
        result = prometheus(concrete(expr))  # a PromQL error fails inside query()
        names = set(NAME_RE.findall(expr))
        if not result and not all(n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in sparse
                                  for n in names):
            empty.append(expr)
    assert not empty, "queries with no data on a live cluster:\n" + "\n".join(empty)


SELECTOR_RE = re.compile(r"\b((?:distserve|etcd)_[a-zA-Z0-9_]+|up)(\{[^}]*\})?")


def test_every_alert_expression_evaluates_and_its_selectors_match_series(live, prometheus):
    sparse = sparse_in_scrape(live)
    problems = []
    for rule in alert_rules():
        prometheus(rule["expr"])  # evaluates (false on a healthy cluster: no result is fine here)
        for name, matchers in SELECTOR_RE.findall(rule["expr"]):
            family = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
            if prometheus(name + matchers) or family in sparse:
                continue
            # a matcher that selects nothing on a healthy cluster (status 5xx, change="lease_expired"):
            # the metric must exist and carry every label the matcher names
            series = prometheus(name)
            labels = set(re.findall(r"(\w+)\s*=~?", matchers))
            if not series or not any(labels <= set(s["metric"]) for s in series):
                problems.append(f"{rule['alert']}: {name}{matchers}")
    assert not problems, problems


def test_alert_rules_are_loaded_healthy_and_quiet_on_a_healthy_cluster(live, prometheus):
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(alert_rules())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [r["name"] for r in rules if r["state"] != "inactive"]


def test_a_crashed_decode_shows_as_a_lease_loss_and_an_unroutable_model(live):
    """What DistserveEngineLeaseLost and DistserveModelUnroutable rely on (runs last: it kills the decode)."""
    before = scrape(live["router"])
    decode_id = next(lab["engine"] for n, lab, _ in prom.samples(before)
                     if n == "distserve_router_picks_total" and lab.get("phase") == "decode")
    live["decode_proc"].kill()  # engine and agent die together: the lease expires after its TTL (3 s)
    deadline = time.monotonic() + 20
    while router_metric(live["router"], "distserve_router_model_routable", {"model": MODEL}) != 0:
        assert time.monotonic() < deadline, scrape(live["router"])
        time.sleep(0.2)
    text = scrape(live["router"])
    assert prom.find(text, "distserve_router_engine_changes_total", {"engine": decode_id, "change": "lease_expired"}) == 1, text
    assert router_metric(live["router"], "distserve_router_links_usable") == 0
    assert router_metric(live["router"], "distserve_router_links_possible") == 0
    assert router_metric(live["router"], "distserve_router_engines_routable") == 0
