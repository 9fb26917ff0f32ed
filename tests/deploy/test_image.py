"""The router image's build (deploy/images/distserve.Dockerfile) fails when its wheel lacks a compiled module of
the router (distserve/router/compiled.py): its check, run here against wheels made for the purpose (the wheel
also carries the C sources, which must not count)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distserve.router import compiled

ROOT = Path(__file__).resolve().parents[2]


def _wheel_check() -> str:
    text = (ROOT / "deploy" / "images" / "distserve.Dockerfile").read_text()
    found = re.search(r'pip wheel[^\n]*\n\s*&& python -c "([^"]+)"', text)
    assert found, "the Dockerfile's wheel check was not found"
    return found.group(1)


def _run(check: str, wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", check.replace("/wheels/", f"{wheels}/")], capture_output=True,
                          text=True, timeout=60)


def _wheel(at: Path, names: list[str]) -> Path:
    at.mkdir()
    with zipfile.ZipFile(at / "distserve-0.1.0-cp311-cp311-linux_x86_64.whl", "w") as w:
        for name in names:
            w.writestr(name, b"")
    return at


def test_the_image_check_names_every_compiled_module():
    check = _wheel_check()
    for source in compiled.SOURCES.values():
        assert f"'{Path(source).stem}'" in check, source


@pytest.mark.parametrize("missing", sorted(compiled.SOURCES))
def test_a_wheel_without_a_compiled_module_fails_the_image_build(tmp_path, missing):
    check = _wheel_check()
    names = [f"distserve/router/{Path(s).name}" for s in compiled.SOURCES.values()]  # the C sources ride along
    names += [f"distserve/router/{Path(s).stem}.cpython-311-x86_64-linux-gnu.so" for part, s in
              compiled.SOURCES.items() if part != missing]
    out = _run(check, _wheel(tmp_path / "some", names))
    assert out.returncode != 0 and Path(compiled.SOURCES[missing]).stem in out.stderr
    complete = names + [f"distserve/router/{Path(compiled.SOURCES[missing]).stem}.cpython-311-x86_64-linux-gnu.so"]
    assert _run(check, _wheel(tmp_path / "all", complete)).returncode == 0
