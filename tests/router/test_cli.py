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
