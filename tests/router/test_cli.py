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
