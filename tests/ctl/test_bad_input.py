"""What a new user gets for a mistake: one clean line on stderr and exit 2 for a bad argument (never a
traceback, "internal error" or pydantic's boilerplate), exit 1 for an unknown id or compacted history, and
lease ids shown one way (hex, as etcdctl shows them) wherever a table shows one."""

from __future__ import annotations

import os

import pytest

from distserve.ctl.main import main
from distserve.cluster.keys import Keys
from tests.ctl.plant import engine

KEYS = Keys()


def _one_line(res, rc: int) -> str:
    assert res.rc == rc, (res.rc, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    for junk in ("Traceback", "internal error", "pydantic", "validation error", "EtcdError", "OUT_OF_RANGE"):
        assert junk not in res.err, res.err
    return lines[0]


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own exits
        rc = exc.code
    return rc, capsys.readouterr().err


# --- watch --since-rev -------------------------------------------------------------------------------------
async def test_a_future_revision_is_a_bad_argument_naming_the_current_one(ctl, etcd_client):
    await etcd_client.put(KEYS.root + "x", b"1")
    current = await etcd_client.put(KEYS.root + "x", b"2")
    for since in (str(current + 2), "99999999", f"{current + 5}:3"):
        line = _one_line(ctl("watch", "--since-rev", since, "--timeout", "5"), 2)
        assert "future" in line and f"current revision is {current}" in line, line
        assert f"--since-rev {current + 1}" in line, line  # what to use instead
    # past int64: refused by the parser, not by etcd's client library
    _one_line(ctl("watch", "--since-rev", "99999999999999999999999"), 2)
    # the next revision is the present, not the future: it waits for the next change
    res = ctl("watch", "--since-rev", str(current + 1), "--json", "--timeout", "0.5")
    assert res.rc == 0 and res.out == "", (res.rc, res.err)


async def test_a_compacted_revision_names_the_oldest_one_and_the_command_that_resumes(ctl, etcd_client):
    revisions = [await etcd_client.put(KEYS.engine(f"E{i}"), engine(f"E{i}", "prefill", "http://127.0.0.1:1").encode())
                 for i in range(6)]
    oldest = revisions[3]
    await etcd_client.compact(oldest)
    for since in (revisions[0], revisions[1]):
        line = _one_line(ctl("watch", "--since-rev", str(since), "--timeout", "5"), 1)  # exit 1: docs/keys.md
        assert "compacted" in line and f"the oldest revision etcd still has is {oldest}" in line, line
        assert f"`distserve-ctl watch --since-rev {oldest}`" in line and "without --since-rev" in line, line
    # the command it names works, from the oldest revision on
    res = ctl("watch", "--since-rev", str(oldest), "--json", "--limit", "3", "--timeout", "10")
    assert res.rc == 0, res.err
    assert [e["revision"] for e in res.lines()] == revisions[3:]


# --- etcd options: validated by discovery.config.EtcdConfig, printed as one line ---------------------------
@pytest.mark.parametrize("endpoint, message", [
    ("htp:/x", "invalid --etcd endpoint 'htp:/x': expected http(s)://host:port"),
    ("ftp://x:1", "invalid --etcd endpoint 'ftp://x:1': expected http(s)://host:port"),
    ("http://h:99999", "invalid --etcd endpoint 'http://h:99999': the port must be a number 1-65535"),
    ("127.0.0.1:0", "invalid --etcd endpoint '127.0.0.1:0': the port must be a number 1-65535"),
    ("127.0.0.1:x", "invalid --etcd endpoint '127.0.0.1:x': the port must be a number 1-65535"),
    ("http://127.0.0.1:1/v3", "invalid --etcd endpoint 'http://127.0.0.1:1/v3': expected http(s)://host:port"),
    (",", "invalid --etcd: no endpoints given"),
    ("http://[::1", "invalid --etcd endpoint 'http://[::1': expected http(s)://host:port"),
])
def test_malformed_etcd_endpoints_get_one_clean_line(endpoint, message, capsys, monkeypatch):
    monkeypatch.delenv("DISTSERVE_ETCD_ENDPOINTS", raising=False)
    rc, err = _run_main(["--etcd", endpoint, "engines"], capsys)
    assert rc == 2, (rc, err)
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"distserve-ctl: {message}"), err
    assert "pydantic" not in err and "validation error" not in err


def test_a_malformed_endpoint_variable_is_named(capsys, monkeypatch):
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "htp:/x")
    rc, err = _run_main(["engines"], capsys)
    assert (rc, err) == (2, "distserve-ctl: invalid DISTSERVE_ETCD_ENDPOINTS endpoint 'htp:/x': "
                            "expected http(s)://host:port\n")


@pytest.mark.parametrize("argv, message", [
    (["--etcd-timeout", "-1"], "invalid --etcd-timeout -1.0: must be a number of seconds > 0"),
    (["--etcd-timeout", "0"], "invalid --etcd-timeout 0.0: must be a number of seconds > 0"),
    (["--etcd-timeout", "inf"], "invalid --etcd-timeout inf"),  # was accepted: every call waited forever
    (["--etcd-timeout", "nan"], "invalid --etcd-timeout nan"),
    (["--etcd-timeout", "abc"], "argument --etcd-timeout: invalid float value: 'abc'"),
    (["--etcd-ca", "/nonexistent/ca.pem"], "invalid --etcd-ca '/nonexistent/ca.pem': no such file"),
    (["--etcd-ca", "/"], "invalid --etcd-ca '/': not a file"),
    (["--etcd-cert", "/nonexistent/c.pem", "--etcd-key", "/nonexistent/k.pem"], "invalid --etcd-cert"),
    (["--etcd-cert", "PEM"], "a client certificate needs both cert and key (--etcd-cert and --etcd-key"),
    (["--etcd-cert", "PEM", "--etcd-key", "PEM"], "a client certificate needs TLS"),  # was silently unused
    (["--etcd-ca", "GARBAGE"], "garbage.pem': not a PEM file"),  # was "etcd unreachable"
    (["--etcd-password", "hunter2"], "a password needs a user"),
    (["--cluster", "a/b"], "invalid cluster"),
])
def test_bad_etcd_options_get_one_clean_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {"PEM": str(pem), "GARBAGE": str(garbage)}
    rc, err = _run_main([*(files.get(a, a) for a in argv), "engines"], capsys)
    assert rc == 2, (argv, rc, err)
    assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert "pydantic" not in err and "hunter2" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_cert_is_a_bad_argument(tmp_path, capsys, monkeypatch):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    ca.chmod(0)
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    rc, err = _run_main(["--etcd-ca", str(ca), "engines"], capsys)
    assert rc == 2 and "not readable" in err and len(err.strip().splitlines()) == 1, err


# --- numbers and ids: refused by the parser, before etcd is contacted --------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["watch", "--limit", "0"], "--limit"),
    (["watch", "--limit", "-1"], "--limit"),  # was accepted: the watch never stopped
    (["watch", "--timeout", "-1"], "--timeout"),  # was accepted: exit 0 at once, nothing watched
    (["watch", "--timeout", "nan"], "--timeout"),
    (["watch", "--since-rev", "-5"], "--since-rev"),
    (["watch", "--since-rev", "3:-1"], "--since-rev"),
    (["watch", "--prefix", "engine/"], "--prefix"),  # was accepted: watched nothing, forever
    (["watch", "--prefix", "../x"], "--prefix"),
    (["top", "--interval", "0"], "--interval"),
    (["top", "--interval", "inf"], "--interval"),
    (["top", "--interval", "0.001"], "--interval"),  # a busy loop redrawing the screen
    (["top", "--iterations", "0"], "--iterations"),
    (["drain", "P1", "--wait", "--timeout", "-5"], "--timeout"),  # was accepted: returned at once
    (["drain", "P1", "--settle", "-1"], "--settle"),
    (["drain", "P1", "--reason", "x" * 2_000_000], "--reason"),  # was sent: etcd refused it, "internal error"
    (["cordon", "P1", "--reason", "a\nb"], "--reason"),
    (["drain", "../x"], "invalid engine id '../x'"),
    (["cordon", "a b"], "invalid engine id 'a b'"),
    (["uncordon", ""], "invalid engine id ''"),
    (["links", "--engine", "../x"], "invalid engine id '../x'"),
    (["doctor", "--skew", "-1"], "--skew"),  # was: exit 1 and no message
    (["doctor", "--http-timeout", "-1"], "--http-timeout"),  # was: exit 0
])
def test_bad_numbers_and_ids_are_refused_before_etcd_is_contacted(argv, option, capsys, monkeypatch):
    # etcd is unreachable here: the message must be about the argument, not the connection
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    rc, err = _run_main(argv, capsys)
    assert rc == 2, (argv, rc, err)
    assert len(err.strip().splitlines()) == 1 and option in err and "unreachable" not in err, (argv, err)


async def test_malformed_ids_exit_2_and_unknown_ones_exit_1(ctl, planter):
    await planter.small_cluster()
    for argv, text in ((["describe", "engine", "../x"], "invalid engine id '../x'"),
                       (["describe", "router", "r 1"], "invalid router id 'r 1'"),
                       (["describe", "link", "a/b/c"], "a link id is PREFILL/DECODE"),
                       (["describe", "link", "P1/../x"], "a link id is PREFILL/DECODE"),
                       (["describe", "engine", "P1", "P2"], "describe engine takes one id, not 2")):
        assert text in _one_line(ctl(*argv), 2), argv
    # an unknown id is a problem, not a bad argument (docs/operations.md: exit 1)
    assert "unknown engine 'nope'; known engines: D1, H1, P1, P2" in _one_line(ctl("links", "--engine", "nope"), 1)
    assert ctl("links", "--engine", "H1").rc == 0  # registered, no links: an empty list, not an error


def test_unreachable_etcd_is_one_line_and_exit_2_for_a_resumed_watch(capsys, monkeypatch):
    monkeypatch.setenv("DISTSERVE_ETCD_ENDPOINTS", "http://127.0.0.1:1")
    rc, err = _run_main(["--etcd-timeout", "1", "watch", "--since-rev", "5"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "etcd unreachable" in err, err
    assert "http://127.0.0.1:1" in err


# --- lease ids: one form -----------------------------------------------------------------------------------
async def test_lease_ids_are_shown_in_hex_everywhere_a_table_shows_them(ctl, planter):
    await planter.small_cluster()
    lease = planter.lease
    hexed, decimal = f"{lease:x}", str(lease)
    for argv in (["describe", "link", "P1/D1"], ["describe", "engine", "P1"], ["describe", "router", "r1"],
                 ["export"]):
        out = ctl("--table", *argv).out
        assert hexed in out, (argv, out)
        assert decimal not in out, (argv, out)  # describe link showed both: etcd.lease hex, summary.lease.id decimal
    # JSON keeps etcd's number (etcdctl -w json does the same)
    assert ctl("describe", "link", "P1/D1", "--json").json()["summary"]["lease"]["id"] == lease
