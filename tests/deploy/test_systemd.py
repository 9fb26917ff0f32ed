"""deploy/systemd, checked offline: the units have the sections and keys systemd needs, `systemd-analyze
verify` accepts them (in a scratch root where the binaries exist), every ExecStart is accepted by the
real CLI once systemd's specifiers and the example environment files are substituted, and each agent is
bound to and ordered after its engine."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.clicheck import check_command, check_lmdeploy
from tests.util import REPO

SDIR = REPO / "deploy" / "systemd"
UNITS = sorted(p.name for p in SDIR.iterdir() if p.suffix in (".service", ".target"))


def load_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    # systemd allows repeated keys (EnvironmentFile=, several lines): keep them all, newline-joined.
    parser._dict = dict
    text = (SDIR / name).read_text()
    seen: dict[tuple[str, str], list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        seen.setdefault((section, key.strip()), []).append(value.strip())
    for (section, key), values in seen.items():
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, "\n".join(values))
    return parser


def env_file(name: str) -> dict[str, str]:
    env = {}
    for line in (SDIR / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def expand(command: str, instance: str, env: dict[str, str]) -> list[str]:
    """systemd's expansion of an Exec line: %i/%H specifiers, then ${VAR} (one word) from the environment."""
    command = command.replace("%i", instance).replace("%H", "gpu-host-1").replace("%%", "%")
    missing = [v for v in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", command) if v not in env]
    assert not missing, f"{command!r}: not set by the environment files: {missing}"
    return [re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], w) for w in shlex.split(command)]


def test_units_have_the_required_sections():
    assert {"distserve-router@.service", "distserve-agent@.service", "lmdeploy-engine@.service",
            "distserve.target"} <= set(UNITS)
    for name in UNITS:
        unit = load_unit(name)
        assert unit.has_option("Unit", "Description"), name
        assert unit.has_option("Install", "WantedBy"), name
        if name.endswith(".service"):
            service = unit["Service"]
            assert service.get("ExecStart", "").startswith("/"), f"{name}: ExecStart needs an absolute path"
            assert service.get("User") == "distserve", f"{name}: never run as root"
            assert service.get("NoNewPrivileges") == "true"
            assert "Restart" in service
            assert unit["Install"]["WantedBy"] == "distserve.target"
            assert unit["Unit"]["PartOf"] == "distserve.target"
            for path in service["EnvironmentFile"].split("\n"):
                assert path.startswith("/etc/distserve/"), path


def instance_env(instance: str) -> dict[str, str]:
    env = env_file("distserve.env.example")
    if instance.startswith(("prefill", "decode")):
        env.update(env_file(f"engine-{instance}.env.example"))
    return env


@pytest.mark.parametrize("instance", ["prefill-0", "decode-0"])
def test_engine_and_agent_commands_are_accepted_and_agree(instance):
    env = instance_env(instance)
    engine = load_unit("lmdeploy-engine@.service")
    agent = load_unit("distserve-agent@.service")
    argv = expand(engine["Service"]["ExecStart"], instance, env)
    assert argv[1:4] == ["-m", "distserve.lmdeploy_ext.serve", "api_server"]
    flags = check_lmdeploy(argv)
    assert flags["--role"] == env["LMDEPLOY_ROLE"] and flags["--backend"] == "pytorch"
    assert flags["--api-keys"] == env["DISTSERVE_CLUSTER_TOKEN"]
    assert flags["--server-name"] not in ("0.0.0.0", "::"), "bind a private interface"
    args = check_command(expand(agent["Service"]["ExecStart"], instance, env), where=f"distserve-agent@{instance}")
    assert args.role == instance.split("-")[0]
    assert args.engine_url == f"http://{flags['--server-name']}:{flags['--server-port']}"
    assert args.advertise_url == args.engine_url
    # The agent stops before its engine (reverse start order) and goes when the engine goes.
    assert agent["Unit"]["BindsTo"] == "lmdeploy-engine@%i.service"
    assert "lmdeploy-engine@%i.service" in agent["Unit"]["After"].split()
    assert engine["Service"]["LimitMEMLOCK"] == "infinity"  # RDMA pins the KV pool


def test_router_command_is_accepted():
    router = load_unit("distserve-router@.service")
    args = check_command(expand(router["Service"]["ExecStart"], "8000", instance_env("router")), where="router")
    assert args.port == 8000


def test_example_environment_keeps_secrets_out_of_the_units():
    for name in UNITS:
        text = (SDIR / name).read_text()
        assert "DISTSERVE_CLUSTER_TOKEN=" not in text and "DISTSERVE_API_KEYS=" not in text, name
    common = env_file("distserve.env.example")
    assert all(url.startswith("https://") for url in common["DISTSERVE_ETCD_ENDPOINTS"].split(","))
    assert {"DISTSERVE_ETCD_CA", "DISTSERVE_ETCD_CERT", "DISTSERVE_ETCD_KEY"} <= set(common)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    root = tmp_path / "root"
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        pytest.skip("no systemd unit directory to verify against")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SDIR / name, root / "etc/systemd/system" / name)
    # The programs the units start must exist and be executable: stand-ins in the scratch root.
    for name in UNITS:
        for key in ("ExecStart", "ExecStop"):
            for line in load_unit(name)["Service"].get(key, "").split("\n") if name.endswith(".service") else []:
                if line:
                    exe = root / line.split()[0].lstrip("/")
                    exe.parent.mkdir(parents=True, exist_ok=True)
                    exe.write_text("#!/bin/sh\n")
                    exe.chmod(0o755)
    instances = ["distserve-router@8000.service", "lmdeploy-engine@prefill-0.service",
                 "distserve-agent@prefill-0.service", "distserve.target"]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *instances],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    # ... and it does reject a broken unit (so the check above means something).
    broken = root / "etc/systemd/system/distserve-router@.service"
    broken.write_text(broken.read_text().replace("ExecStart=", "ExecStrat="))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", "distserve-router@8000.service"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ExecStrat" in out.stderr
