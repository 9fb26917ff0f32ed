"""lmdeploy_ext's environment: read in one module, typed and bounded; a bad value is one line at start-up."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from distserve.lmdeploy_ext import settings
from distserve.lmdeploy_ext.settings import SettingsError, StagedTcpSettings
from tests.util import REPO

PACKAGE = Path(REPO) / "distserve" / "lmdeploy_ext"


@pytest.mark.parametrize("name, value", [
    ("DISTSERVE_LMDEPLOY_STAGING_MB", "0"),
    ("DISTSERVE_LMDEPLOY_STAGING_MB", "lots"),
    ("DISTSERVE_LMDEPLOY_STAGING_MB", "1e9"),
    ("DISTSERVE_LMDEPLOY_CHUNK_KB", "nan"),
    ("DISTSERVE_LMDEPLOY_MIGRATION_DEADLINE_S", "-1"),
    ("DISTSERVE_LMDEPLOY_CONTROL_TIMEOUT_S", "inf"),
    ("DISTSERVE_LMDEPLOY_TRANSFER_HOST", "10.0.0.1 10.0.0.2"),
    ("DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL", "carrier-pigeon"),
    ("DISTSERVE_LOG_LEVEL", "LOUD"),
])
def test_bad_value_is_refused_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        settings.load({name: value})


def test_values_are_parsed_and_defaults_kept():
    s = settings.load({"DISTSERVE_LMDEPLOY_STAGING_MB": "8", "DISTSERVE_LMDEPLOY_CHUNK_KB": "512",
                       "DISTSERVE_LMDEPLOY_TRANSFER_HOST": "10.1.2.3", "DISTSERVE_LMDEPLOY_MIGRATION_PROTOCOL": "RDMA",
                       "DISTSERVE_LOG_LEVEL": "debug", "DISTSERVE_LMDEPLOY_EXT": "1"})
    assert s.staged_tcp == StagedTcpSettings(staging_bytes=8 << 20, chunk_bytes=512 << 10, host="10.1.2.3")
    assert (s.protocol, s.log_level, s.enabled) == ("rdma", "DEBUG", True)
    assert settings.load({}) == settings.LmdeploySettings(False, None, "INFO", StagedTcpSettings())


def test_engine_process_falls_back_to_defaults(monkeypatch, caplog):
    """lmdeploy's engine process must never die of a bad value: it logs it and uses the defaults."""
    monkeypatch.setenv("DISTSERVE_LMDEPLOY_CHUNK_KB", "zero")
    assert StagedTcpSettings.from_env_or_default() == StagedTcpSettings()
    assert "DISTSERVE_LMDEPLOY_CHUNK_KB" in caplog.text


@pytest.mark.parametrize("name, value", [("DISTSERVE_LMDEPLOY_STAGING_MB", "-5"), ("DISTSERVE_LOG_LEVEL", "LOUD")])
def test_launcher_refuses_a_bad_value_in_one_line(name, value):
    env = {"PATH": "/usr/bin:/bin", name: value}
    proc = subprocess.run([sys.executable, "-m", "distserve.lmdeploy_ext.serve", "api_server", "/nonexistent"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_import_cycle_inside_lmdeploy_ext():
    """install.py and server_patches.py used to import each other (inside functions)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "distserve.lmdeploy_ext":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("distserve.lmdeploy_ext."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = deps & {p.stem for p in PACKAGE.glob("*.py")}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ()))

    assert [m for m in graph if reaches(m, m)] == []
