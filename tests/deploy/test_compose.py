"""deploy/compose, checked offline: the file is a valid Compose file (parsed by a strict compose-spec
implementation after the interpolation Docker Compose does), every service it depends on exists, every
command is accepted by the real CLI, and the single-host security rules hold (only routers face the
network; engines and etcd bind loopback)."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml
from compose_spec import PyCompose

from tests.deploy.clicheck import check_command, check_lmdeploy
from tests.util import REPO

CDIR = REPO / "deploy" / "compose"
ENTRYPOINT = {"distserve": ["distserve"]}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Docker Compose's interpolation: ${VAR}, ${VAR:-default}, $VAR, and $$ for a literal $."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        value = env.get(name)
        return value if value else (m.group(3) or "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def example_env() -> dict[str, str]:
    env = {}
    for line in (CDIR / "distserve.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict:
    text = interpolate((CDIR / "compose.yaml").read_text(), {})
    spec = PyCompose.from_yaml(yaml.safe_dump(yaml.safe_load(text), sort_keys=False))  # merges `<<` first
    spec.validate()
    return spec.to_dict()


def test_compose_spec_parser_rejects_mistakes():
    """The validation above can fail: an unknown service key and a bad duration are errors."""
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  a:\n    imagee: x\n")
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    healthcheck: {interval: 5 parsecs}\n")


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert {"etcd", "prefill", "prefill-agent", "decode", "decode-agent", "router-1", "router-2"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    for name in ("prefill-agent", "decode-agent", "router-1", "router-2"):
        assert services[name]["depends_on"]["etcd"]["condition"] == "service_healthy"
    for name in ("etcd", "prefill", "decode", "router-1", "router-2"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def argv_of(svc: dict, env: dict[str, str]) -> list[str]:
    command = svc["command"]
    if command[:2] == ["sh", "-c"]:  # the container's shell expands $VAR from its environment
        argv = shlex.split(interpolate(command[2], env))
        return argv[1:] if argv[0] == "exec" else argv
    image = svc["image"].split(":")[0]
    return [*ENTRYPOINT[image], *command]


def test_every_command_is_accepted_by_the_real_cli(compose):
    env = {**example_env(), "MODEL_PATH": "/models/m", "MODEL_NAME": "m"}
    checked = 0
    for name, svc in compose["services"].items():
        if name == "etcd":
            continue
        check_command(argv_of(svc, env), where=f"compose {name}")
        checked += 1
    assert checked == 6


@pytest.mark.parametrize("pool,role,gpu", [("prefill", "Prefill", "0"), ("decode", "Decode", "1")])
def test_engines_pair_with_their_agents_on_loopback(compose, pool, role, gpu):
    env = {**example_env(), "MODEL_PATH": "/models/m", "MODEL_NAME": "m"}
    services = compose["services"]
    engine, agent = services[pool], services[f"{pool}-agent"]
    assert argv_of(engine, env)[:4] == ["python3", "-m", "distserve.lmdeploy_ext.serve", "api_server"]
    flags = check_lmdeploy(argv_of(engine, env))
    assert flags["--role"] == role and flags["--backend"] == "pytorch"
    assert flags["--server-name"] == "127.0.0.1", "engine ports must not face the network"
    assert flags["--api-keys"] == env["DISTSERVE_CLUSTER_TOKEN"]
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]
    assert "IPC_LOCK" in engine["cap_add"] and engine["ulimits"]["memlock"] == -1
    args = check_command(argv_of(agent, env), where=f"compose {pool}-agent")
    assert args.role == pool
    assert args.engine_url == f"http://127.0.0.1:{flags['--server-port']}"
    assert agent["depends_on"][pool]["condition"] == "service_started"


def test_only_routers_listen_beyond_loopback(compose):
    services = compose["services"]
    for svc in services.values():
        assert svc["network_mode"] == "host"
        assert "ports" not in svc  # host networking: what a process binds is what is exposed
    etcd_args = dict(a.split("=", 1) for a in services["etcd"]["command"][1:] if "=" in a)
    for flag in ("--listen-client-urls", "--listen-peer-urls", "--listen-metrics-urls"):
        assert etcd_args[flag].startswith("http://127.0.0.1:"), flag
    ports = []
    for name in ("router-1", "router-2"):
        args = check_command(argv_of(services[name], example_env()), where=name)
        assert args.host == "0.0.0.0"
        ports.append(args.port)
    assert len(set(ports)) == 2


def test_secrets_come_from_an_ignored_env_file(compose):
    for name, svc in compose["services"].items():
        inline = svc.get("environment", {})
        assert not {"DISTSERVE_CLUSTER_TOKEN", "DISTSERVE_API_KEYS"} & set(inline), f"{name}: secret inline"
        if name != "etcd":
            assert svc["env_file"] == ["distserve.env"], name
    assert set(example_env()) == {"DISTSERVE_CLUSTER_TOKEN", "DISTSERVE_API_KEYS"}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(CDIR / "distserve.env")], cwd=REPO)
    assert ignored.returncode == 0, "deploy/compose/distserve.env would be committed"


def test_make_env_writes_header_safe_secrets(tmp_path):
    (tmp_path / "make-env.sh").write_text((CDIR / "make-env.sh").read_text())
    subprocess.run(["bash", str(tmp_path / "make-env.sh")], check=True, capture_output=True, timeout=30)
    written = (tmp_path / "distserve.env").read_text()
    values = dict(line.split("=", 1) for line in written.splitlines() if line and not line.startswith("#"))
    assert set(values) == set(example_env())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{32,}", v) for v in values.values())
    assert (tmp_path / "distserve.env").stat().st_mode & 0o077 == 0
    subprocess.run(["bash", str(tmp_path / "make-env.sh")], check=True, capture_output=True, timeout=30)
    assert (tmp_path / "distserve.env").read_text() == written  # idempotent: never rotates silently
