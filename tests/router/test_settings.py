"""Router settings: one pydantic schema bounds them wherever they are built; env read in one module."""

from __future__ import annotations

import pytest

from distserve.router.settings import RouterSettings, env_api_keys, env_cluster, env_cluster_token, env_log_level


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"connect_timeout": 0}, "--connect-timeout must be > 0"),
        ({"lease_ttl": -1}, "--lease-ttl must be > 0"),
        ({"max_decode_attempts": 0}, "--max-prefill-attempts and --max-decode-attempts must be >= 1"),
        ({"header_read_timeout": 301}, "--header-read-timeout must be in (0, 300] seconds"),
        ({"body_read_timeout": 0}, "--body-read-timeout must be in (0, 3600] seconds"),
        ({"route_wait": 601}, "--route-wait must be in 0-600 seconds"),
        ({"max_body_bytes": 1023}, "--max-body-bytes must be >= 1024"),
        ({"max_in_flight": -1}, "--max-in-flight must be in 0-1000000 (0 = unbounded)"),
        ({"port": 65536}, "--port must be in 0-65535"),
        ({"max_in_flight": "many"}, "--max-in-flight: "),
        ({"no_such_setting": 1}, "--no-such-setting: "),
    ],
)
def test_out_of_bounds_settings_are_one_line_naming_the_option(values, message):
    with pytest.raises(ValueError) as info:
        RouterSettings.checked(**values)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


def test_secrets_stay_out_of_the_settings_repr():
    s = RouterSettings(api_keys=["k-secret"], cluster_token="t-secret")
    assert "secret" not in repr(s)


def test_environment_defaults():
    env = {"DISTSERVE_CLUSTER": "prod", "DISTSERVE_CLUSTER_TOKEN": "tok", "DISTSERVE_API_KEYS": " a, ,b ",
           "DISTSERVE_LOG_LEVEL": "DEBUG"}
    assert (env_cluster(env), env_cluster_token(env), env_api_keys(env), env_log_level(env)) == (
        "prod", "tok", ["a", "b"], "DEBUG")
    empty = {"DISTSERVE_CLUSTER": "", "DISTSERVE_LOG_LEVEL": ""}  # an empty VAR= means unset
    assert (env_cluster(empty), env_cluster_token(empty), env_api_keys(empty), env_log_level(empty)) == (
        "default", None, [], "INFO")
