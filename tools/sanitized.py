"""Build one of the router's C modules with AddressSanitizer and UndefinedBehaviorSanitizer (gcc) into a scratch
directory and run a fuzzing tool against that build, the sanitizers' runtime preloaded (tools/fuzz_heads.py,
tools/fuzz_shortlist.py): a read past a buffer, a use after release, or undefined arithmetic stops the run with
the sanitizer's report."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

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
