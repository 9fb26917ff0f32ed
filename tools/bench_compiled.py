#!/usr/bin/env python3
"""Would compiling the router's engine client make it cheaper? An experiment, kept so its figures can be re-run.

Two scratch copies of this tree's `distserve` and `discovery` (`git archive HEAD`) under .bench/compiled/:
`plain`, as is, and `typed`, where distserve/router/http1.py (the engine client: the router module with the
most Python-level work per request, about a fifth of py-spy's samples) is compiled by Cython with
tools/compiled/http1.pxd: its three classes become C types (attributes as struct fields, their methods called
directly). The only source change: `_Connection` loses its `asyncio.Protocol` base (a C type cannot derive
from a Python class; event loops take any object with the protocol's methods). Then tools/bench_hot_path.py
compares the two, interleaved. Cython (CYTHON_VERSION) is installed into .bench/cython-venv; a C compiler
and Python's headers are needed.

    .venv/bin/python tools/bench_compiled.py [--concurrency 1 16 64] [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".bench" / "compiled"
VENV = ROOT / ".bench" / "cython-venv"
CYTHON_VERSION = "3.3.1"


def scratch_tree(name: str) -> Path:
    tree = OUT / name
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "distserve", "discovery",
                              "pyproject.toml"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def cythonize(tree: Path) -> None:
    cython = VENV / "bin" / "cythonize"
    if not cython.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"Cython=={CYTHON_VERSION}", "setuptools"], check=True)
    source = tree / "distserve" / "router" / "http1.py"
    text = source.read_text()
    base = "class _Connection(asyncio.Protocol):"
    if base not in text:
        raise SystemExit(f"bench_compiled: {source} no longer declares {base!r}: update this tool")
    source.write_text(text.replace(base, "class _Connection:"))
    shutil.copy(ROOT / "tools" / "compiled" / "http1.pxd", source.with_suffix(".pxd"))
    # the .pxd alone types the module: the annotations are for readers and mypy, not all exact C types
    subprocess.run([str(cython), "-X", "annotation_typing=False", "-i", "-3", "-q", str(source)], check=True,
                   cwd=tree)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    plain, typed = scratch_tree("plain"), scratch_tree("typed")
    cythonize(typed)
    return subprocess.call([sys.executable, str(ROOT / "tools" / "bench_hot_path.py"), "--trees", str(plain),
                            str(typed), "--concurrency", *map(str, args.concurrency), "--seconds",
                            str(args.seconds), "--repeats", str(args.repeats)])


if __name__ == "__main__":
    sys.exit(main())
