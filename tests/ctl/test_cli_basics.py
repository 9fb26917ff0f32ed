"""Arguments, exit codes and the unreachable-etcd promise (exit 2 within the configured timeout)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from distserve.ctl.main import main
from tests.ctl.conftest import run_ctl
from tests.util import free_port

# Every command reaches etcd through the same first contact (distserve.ctl.context.connect): a few
# representative ones (reads, the stream, a write, the live view) show it holds for each kind.
COMMANDS = [["engines"], ["watch"], ["drain", "P1"], ["top", "--once"], ["doctor"], ["config", "set", "strategy", "random"]]


def _assert_unreachable(res, endpoint: str, timeout: float) -> None:
    assert res.rc == 2, (res.rc, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err  # one line, never a traceback
    assert "unreachable" in lines[0] and endpoint in lines[0], lines[0]
    assert "Traceback" not in res.err
    # the whole process (interpreter start-up included) ends within the configured timeout (+ slack for
    # a loaded 2-core box)
    assert res.elapsed < timeout + 2.5, res.elapsed


def test_every_command_exits_2_naming_the_endpoints_when_refused():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    other = f"http://127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(4) as pool:  # 4 at a time: 2 cores, so allow extra start-up time below
        results = list(pool.map(lambda cmd: run_ctl(f"{endpoint},{other}", "--etcd-timeout", "1.5", *cmd), COMMANDS))
    for command, res in zip(COMMANDS, results):
        assert res.rc == 2, (command, res.rc, res.out, res.err)
        assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err, (command, res.err)
        assert endpoint in res.err and other in res.err, (command, res.err)
        assert res.elapsed < 1.5 + 10, (command, res.elapsed)  # 4 interpreters starting on 2 busy cores
    # alone, the whole process (interpreter start-up included) ends within the timeout (+ slack for a busy box)
    _assert_unreachable(run_ctl(endpoint, "--etcd-timeout", "1.5", "status"), endpoint, 1.5)


def test_silent_endpoint_exits_2_within_the_timeout():
    """A listener that never answers (a black hole): only the timeout can end it."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
        res = run_ctl(endpoint, "--etcd-timeout", "2", "engines")
        _assert_unreachable(res, endpoint, 2)


def test_frozen_etcd_exits_2_within_the_default_timeout(etcd):
    """A SIGSTOPped etcd accepts connections and answers nothing; the default timeout is 5 s."""
    etcd.pause()
    try:
        res = run_ctl(etcd.endpoints, "status")
    finally:
        etcd.resume()
    _assert_unreachable(res, etcd.client_url, 5.0)


def test_endpoints_from_option_and_env(etcd):
    dead = f"http://127.0.0.1:{free_port()}"
    # the option wins over DISTSERVE_ETCD_ENDPOINTS
    assert run_ctl(dead, "--etcd", etcd.client_url, "engines", "--json").rc == 0
    res = run_ctl(dead, "--etcd-timeout", "1", "engines")
    assert res.rc == 2 and dead in res.err


@pytest.mark.parametrize("argv", [
    ["bogus"], [], ["describe", "widget", "x"], ["watch", "--since-rev", "abc"], ["watch", "--since-rev", "0"],
    ["drain"], ["top", "--once", "--iterations", "2"], ["engines", "--role", "king"],
    ["--etcd", "ftp://x:1", "engines"], ["--etcd-timeout", "-1", "engines"], ["--cluster", "a/b", "engines"],
])
def test_bad_arguments_one_line_nonzero(argv, capsys, monkeypatch):
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own exits
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_help_lists_every_command():
    res = run_ctl("http://127.0.0.1:1", "--help")
    assert res.rc == 0
    for name in ("status", "engines", "links", "routers", "models", "describe", "top", "watch", "drain", "cordon",
                 "uncordon", "doctor", "config", "export"):
        assert name in res.out


def test_every_command_line_in_the_operations_guide_parses():
    """docs/operations.md stays true: each `distserve-ctl ...` line of its examples is accepted as written."""
    import re
    import shlex

    from distserve.ctl.main import build_parser
    from tests.util import REPO

    text = (REPO / "docs" / "operations.md").read_text()
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("distserve-ctl ")]
    commands = [[w.split(">")[0] for w in argv if not w.startswith(">")] for argv in commands]
    assert len(commands) >= 15
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args([a for a in argv if a])
        except SystemExit:
            raise AssertionError(f"docs/operations.md: distserve-ctl {' '.join(argv)} does not parse") from None
