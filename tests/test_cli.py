"""The console script: --help on every command, and a clean error for bad configuration."""

import subprocess
import sys

import pytest

COMMANDS = [[], ["stack"], ["processor"], ["sink"], ["demo"], ["schema"], ["org"], ["org", "set-tier"], ["org", "get"],
            ["db"], ["key"], ["key", "set-limit"], ["key", "clear-limits"], ["key", "show"], ["enforcement"],
            ["gateway"], ["api"], ["supervise"]]


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
