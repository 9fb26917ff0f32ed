"""The router's compiled parts (distserve/router/compiled.py): every C module is what the router runs wherever a
compiler is at install (a silent fallback would measure and ship the slow paths), and DISTSERVE_PURE_PYTHON=1
selects the Python specifications for all of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distserve.router import compiled


def test_the_router_runs_every_c_module_where_a_compiler_is():
    if os.environ.get("DISTSERVE_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("DISTSERVE_PURE_PYTHON is set")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the Python versions are the router's")
    assert compiled.implementations() == dict.fromkeys(compiled.SOURCES, "c"), (
        "a C module was not built: run tools/setup (pip install -e .)")
    assert compiled.summary() == "c"


def test_pure_python_can_be_asked_for():
    code = "from distserve.router import compiled; print(compiled.implementations())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, DISTSERVE_PURE_PYTHON="1"),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(dict.fromkeys(compiled.SOURCES, "python")), out.stderr


def test_every_compiled_part_is_built_by_setup_py():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")) as f:
        setup_py = f.read()
    for source in compiled.SOURCES.values():
        assert f'"{source}"' in setup_py, source
