"""`distserve router` options: environment defaults shared with agent, ctl and `up`."""

from __future__ import annotations

import argparse

from distserve.router.cli import add_arguments, settings_from_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cluster_defaults_from_the_environment_and_the_option_wins(monkeypatch):
    monkeypatch.delenv("DISTSERVE_CLUSTER", raising=False)
    assert settings_from_args(parse()).cluster == "default"
    monkeypatch.setenv("DISTSERVE_CLUSTER", "prod-a")
    assert settings_from_args(parse()).cluster == "prod-a"
    assert settings_from_args(parse("--cluster", "other")).cluster == "other"


def test_out_of_range_options_are_refused_before_the_router_starts():
    import pytest

    for argv, word in (
        (("--max-in-flight", "-1"), "--max-in-flight"),
        (("--header-read-timeout", "0"), "--header-read-timeout"),
        (("--route-wait", "601"), "--route-wait"),
        (("--max-prefill-attempts", "0"), "--max-prefill-attempts"),
    ):
        with pytest.raises(ValueError, match=word):
            settings_from_args(parse(*argv))
    assert settings_from_args(parse("--max-in-flight", "64")).max_in_flight == 64


def test_a_bad_pure_python_switch_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, DISTSERVE_PURE_PYTHON="yes", DISTSERVE_ETCD_ENDPOINTS="http://127.0.0.1:1")
    out = subprocess.run([sys.executable, "-m", "distserve", "router", "--port", "0"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == "distserve router: DISTSERVE_PURE_PYTHON must be 1 or 0, not 'yes'"
