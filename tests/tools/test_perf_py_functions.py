"""tools/perf_py_functions.py charges each perf sample to its innermost Python function, kernel time apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "perf_py_functions.py"

SCRIPT = """\
    7f01 _PyEval_EvalFrameDefault
    7f02 py::_Connection._head:/x/distserve/router/http1.py
    7f03 py::_Connection.data_received:/x/distserve/router/http1.py

    ffff finish_task_switch
    ffff do_syscall_64
    7f04 __libc_write
    7f05 py::_Connection.start:/x/distserve/router/http1.py

    7f06 memchr
    7f02 py::_Connection._head:/x/distserve/router/http1.py

    7f07 uv__io_poll
"""


def test_samples_are_charged_to_the_innermost_python_function(tmp_path):
    path = tmp_path / "perf.txt"
    path.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "samples 4"
    assert lines[1].split() == ["50.0%", "user", "50.0%", "sys", "0.0%", "_Connection._head", "http1.py"]
    assert " 25.0%  user   0.0%  sys  25.0%  _Connection.start http1.py" in lines
    assert " 25.0%  user  25.0%  sys   0.0%  (no Python frame)" in lines


def test_no_samples_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    out = subprocess.run([sys.executable, str(TOOL), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
