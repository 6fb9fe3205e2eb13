"""The console script: --help on every command, a clean error for bad configuration, and
`quotaflow config check`."""

import json
import os
import subprocess
import sys

import pytest

COMMANDS = [[], ["stack"], ["processor"], ["sink"], ["demo"], ["schema"], ["org"], ["org", "set-tier"], ["org", "get"],
            ["db"], ["key"], ["key", "set-limit"], ["key", "clear-limits"], ["key", "show"], ["keys"], ["keys", "create"],
            ["keys", "list"], ["keys", "show"], ["keys", "update"], ["keys", "revoke"], ["keys", "rotate"],
            ["keys", "rebuild"], ["enforcement"], ["admin"], ["gateway"], ["ingest"], ["api"], ["supervise"], ["sql"],
            ["config"],
            ["alerts"], ["alerts", "rules"], ["alerts", "rules", "add"], ["alerts", "rules", "list"],
            ["alerts", "rules", "rm"], ["alerts", "rules", "test"], ["ship"]]


def quotaflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quotaflow", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_every_registered_command_is_in_the_help_test():
    from quotaflow.cli.registry import commands

    assert {c.name for c in commands()} == {command[0] for command in COMMANDS if command}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "quotaflow")
def test_every_command_has_help(command):
    result = quotaflow(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: quotaflow {' '.join(command)}".rstrip())


def test_bad_configuration_is_reported_by_name(monkeypatch):
    import os

    env = {**os.environ, "QUOTAFLOW_KAFKA_PORT": "not-a-port"}
    result = quotaflow("stack", "status", env=env)
    assert result.returncode == 2
    assert "quotaflow: invalid configuration" in result.stderr and "kafka_port" in result.stderr


def test_schema_export_prints_the_json_schema():
    import orjson

    result = quotaflow("schema", "export")
    assert result.returncode == 0
    assert orjson.loads(result.stdout)["title"] == "quotaflow RequestEvent v1"


def test_config_check_prints_the_effective_configuration_with_secrets_hidden(tmp_path):
    password, token, short_token = "pw-5f0e1d2c", "tok-0123456789abcdef", "abc"
    env = {**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_WINDOWS": "1,60,3600",
           "QUOTAFLOW_REDIS_URL": f"redis://:{password}@10.0.0.1:6379/0",
           "QUOTAFLOW_CLICKHOUSE_URL": f"https://user:{password}@ch.example:8443/db?password={password}",
           "QUOTAFLOW_API_TOKENS": json.dumps({token: "acme", short_token: "*"})}
    result = quotaflow("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert password not in out and token not in out and f'"{short_token}"' not in out
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if line.startswith("QUOTAFLOW_"))
    assert lines["QUOTAFLOW_WINDOWS"] == "1,60,3600"
    assert lines["QUOTAFLOW_REDIS_URL"] == "'redis://:***@10.0.0.1:6379/0'"
    assert lines["QUOTAFLOW_CLICKHOUSE_URL"] == "'https://user:***@ch.example:8443/db?password=***'"
    assert lines["QUOTAFLOW_API_TOKENS"] == """'{"***":"acme","***":"*"}'"""
    assert lines["QUOTAFLOW_SLIDING_WINDOWS"] == "false  # default"
    assert result.stdout.splitlines()[-1] == ("configuration valid: 3 fixed windows (1s, 60s, 3600s), 5 tiers "
                                              "(default FREE), 2 API tokens")


@pytest.mark.parametrize("env, variable", [
    ({"QUOTAFLOW_TIER_LIMITS": '{"FREE":[1,2]}'}, "QUOTAFLOW_TIER_LIMITS"),  # the example
    ({"QUOTAFLOW_WINDOWS": "60,hour"}, "QUOTAFLOW_WINDOWS"),
    ({"QUOTAFLOW_WINDOWS": "1,60"}, "QUOTAFLOW_WINDOWS"),  # two windows, the default limits have three
    ({"QUOTAFLOW_API_TOKENS": json.dumps({"tok-0123456789abcdef": "not an org"})}, "QUOTAFLOW_API_TOKENS"),
])
def test_config_check_refuses_an_invalid_configuration_in_one_line(env, variable, tmp_path):
    result = quotaflow("config", "check", env={**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), **env})
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"quotaflow: invalid configuration: {variable}"), result.stderr
    assert "tok-0123456789abcdef" not in result.stderr


@pytest.mark.parametrize("command", [["org", "get", "acme"], ["key", "show", "acme", "web"], ["gateway"],
                                     ["processor"], ["sink"], ["stack", "status"]], ids=" ".join)
def test_bad_limits_stop_every_command_in_one_line_before_it_starts(command, tmp_path):
    """Before, this passed the settings and each command failed later with a traceback."""
    env = {**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_TIER_LIMITS": '{"FREE":[1,2]}'}
    result = quotaflow(*command, env=env)
    assert result.returncode == 2
    assert result.stderr == ("quotaflow: invalid configuration: QUOTAFLOW_TIER_LIMITS (tier_limits): tier FREE has "
                             "2 limits for the 3 windows of QUOTAFLOW_WINDOWS\n")


@pytest.mark.parametrize("stage", ["processor", "sink"])
def test_a_taken_metrics_port_is_one_line_naming_its_setting(stage, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        variable = f"QUOTAFLOW_{stage.upper()}_METRICS_PORT"
        result = quotaflow(stage, env={**os.environ, "QUOTAFLOW_STATE_DIR": str(tmp_path), variable: str(port)})
    assert result.returncode == 1
    assert result.stderr == (f"quotaflow: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
                             f"({variable} sets the port, 0 turns them off)\n")
