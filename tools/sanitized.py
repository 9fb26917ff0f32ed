"""Build one of the router's C modules with AddressSanitizer and UndefinedBehaviorSanitizer (gcc) into a scratch
directory and run a fuzzing tool against that build, the sanitizers' runtime preloaded (tools/fuzz_heads.py,
tools/fuzz_shortlist.py): a read past a buffer, a use after release, or undefined arithmetic stops the run with
the sanitizer's report."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def run_sanitized(source: str, module: str, tool: str, argv: list[str]) -> int:
    """Build `source` (relative to the repository) as `module`'s file name, then run `tool` with `argv` and
    `--module <the build>` under the sanitizers; its exit status."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / f"{module.rsplit('.', 1)[-1]}{sysconfig.get_config_var('EXT_SUFFIX')}"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                        f"-I{sysconfig.get_paths()['include']}", str(ROOT / source), "-o", str(target)],
                       check=True, timeout=300)
        runtime = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0")
        return subprocess.run([sys.executable, tool, *argv, "--module", str(target)], env=env,
                              timeout=3600).returncode


def load_build(module: str, path: str) -> ModuleType:
    """The module built at `path` (the child run's `--module`)."""
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def fuzz_main(tool: str, doc: str, module: str, fuzz: Callable[[ModuleType, int, int], int],
              default_iterations: int) -> int:
    """A fuzzing tool's command line: `--iterations`, `--seed`, `--sanitize` (build `module`'s C source with the
    sanitizers and run `tool` again under them, with `--module`), else fuzz the C module as built here (exit 2
    where it is not). `module`: "_heads", "_shortlist" or "_ring_ops"."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--iterations", type=int, default=default_iterations)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sanitize", action="store_true", help="build with ASan and UBSan (gcc) and run under them")
    p.add_argument("--module", help=argparse.SUPPRESS)  # the sanitized build, in the child run
    args = p.parse_args()
    name = Path(tool).stem
    if args.iterations < 1:
        print(f"{name}: --iterations must be >= 1", file=sys.stderr)
        return 2
    qualified = f"distserve.router.{module}"
    if args.sanitize:
        return run_sanitized(f"distserve/router/{module}.c", qualified, tool,
                             ["--iterations", str(args.iterations), "--seed", str(args.seed)])
    if args.module:
        built = load_build(qualified, args.module)
    else:
        sys.path.insert(0, str(ROOT))
        from distserve.router.compiled import load  # noqa: PLC0415 - after the repository is on the path

        built = load(module)
        if built is None:
            print(f"{name}: the C module is not built here (tools/setup builds it)", file=sys.stderr)
            return 2
    return fuzz(built, args.iterations, args.seed)
