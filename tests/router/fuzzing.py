"""The C modules' fuzzing tools (tools/fuzz_*.py) run under AddressSanitizer and UndefinedBehaviorSanitizer, for
the tests beside each module."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.util import REPO

TOOLS = REPO / "tools"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc here")


def run_sanitized_fuzz(tool: str, iterations: int = 20000) -> str:
    """`tools/<tool> --sanitize --iterations N`: its output, once it exited 0 (else its stderr fails the test)."""
    out = subprocess.run([sys.executable, str(TOOLS / tool), "--sanitize", "--iterations", str(iterations)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
