"""Secrets never leave in a message: passwords in service URLs, bearer tokens and the
configured API tokens are redacted in every error the `quotaflow` command prints and
every log line any library writes; settings errors name the variable, never its value.

The commands are run as a user would run them (subprocesses), against ports where
nothing listens, so each fails the way a mistyped or unreachable service makes it fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import MASK, redact, url_secrets

PASSWORD = "s3cret-pass"
REDIS_PASSWORD = "r3dis-pass-42"
TOKEN = "s3cret-token-0123456789"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quotaflow(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quotaflow", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked:\n{text}"


def error_line(result: subprocess.CompletedProcess) -> str:
    """The command's own message: one line starting 'quotaflow: ', and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("quotaflow: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- the helper --------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    (f"cannot open ClickHouse at http://user:{PASSWORD}@127.0.0.1:8123/db: refused",
     "cannot open ClickHouse at http://user:***@127.0.0.1:8123/db: refused"),
    (f"redis://:{PASSWORD}@h:6379/0", "redis://:***@h:6379/0"),
    (f"rediss://{PASSWORD}@h/0", "rediss://***@h/0"),  # Redis reads a lone user info as a password
    (f"http://u:p@{PASSWORD}@h/db", "http://u:***@h/db"),  # an unencoded '@' in the password
    (f"https://h:8443/?user=u&password={PASSWORD}&x=1", "https://h:8443/?user=u&password=***&x=1"),
    (f"Authorization: Bearer {PASSWORD}", "Authorization: Bearer ***"),
    (f"headers={{'authorization': 'bearer {PASSWORD}'}}", "headers={'authorization': 'bearer ***'}"),
    # What carries no secret stays as it was.
    ("missing or unknown bearer token", "missing or unknown bearer token"),
    ("http://127.0.0.1:8123/db and http://user@host/x", "http://127.0.0.1:8123/db and http://user@host/x"),
    ("org acme, key acme-web: 12 events", "org acme, key acme-web: 12 events"),
])
def test_redact_hides_secrets_and_keeps_the_rest(text, want):
    assert redact(text) == want


@given(password=st.text(st.characters(exclude_categories=("Cs",)).filter(lambda c: not c.isspace()), min_size=1),
       scheme=st.sampled_from(["http", "https", "redis", "rediss", "clickhouse"]),
       before=st.text(st.characters(exclude_categories=("Cs",)).filter(lambda c: c not in ":/@")), after=st.text())
def test_any_password_in_a_url_is_hidden_wherever_the_url_stands(password, scheme, before, after):
    url = f"{scheme}://user:{password}@db.example:1/x"
    out = redact(f"{before} {url} {after}")
    assert f" {scheme}://user:{MASK}@db.example:1/x " in out
    if not set(password) & set("/?#[]@") and password.isascii():  # else urlsplit reads another netloc
        assert password in url_secrets(url)


def test_logging_redacts_every_record_whatever_logger_wrote_it(tmp_path):
    """Records of a library's logger, of ours with extra= values and an exception, with
    %-arguments, in both formats: none carries a secret, every one is still written."""
    script = textwrap.dedent(f"""
        import logging, sys
        from quotaflow.core.settings import get_settings
        from quotaflow.core.logs import setup_logging
        settings = get_settings()  # registers the configured tokens and URL passwords
        setup_logging("INFO", sys.argv[1])
        logging.getLogger("urllib3.connectionpool").warning("Retrying %s", "http://u:{PASSWORD}@h:1/db")
        logging.getLogger("aiokafka").error("auth: Bearer {TOKEN}")
        log = logging.getLogger("quotaflow.test")
        log.warning("settings", extra={{"url": settings.redis_url, "tokens": dict(settings.api_tokens),
                                        "nested": [{{"dsn": "http://u:{PASSWORD}@h"}}]}})
        log.info("token %s seen", "{TOKEN}")
        try:
            raise ConnectionError("cannot reach http://user:{PASSWORD}@h:1/db")
        except ConnectionError:
            log.exception("connect failed")
        log.warning("stack", stack_info=True, extra={{"why": "{TOKEN}"}})
    """)
    env = {**os.environ, "QUOTAFLOW_API_TOKENS": json.dumps({TOKEN: "acme"}),
           "QUOTAFLOW_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}
    for fmt in ("json", "text"):
        result = subprocess.run([sys.executable, "-c", script, fmt], capture_output=True, text=True, env=env,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert_no_secret(result.stderr, PASSWORD, TOKEN, REDIS_PASSWORD)
        for written in ("Retrying", "auth: Bearer ***", "settings", "token *** seen", "connect failed",
                        "ConnectionError: cannot reach http://user:***@h:1/db", "stack"):
            assert written in result.stderr, (written, result.stderr)
        if fmt == "json":
            lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
            assert len(lines) == 6
            assert lines[2]["tokens"] == {MASK: "acme"} and lines[2]["url"] == "redis://:***@127.0.0.1:1/0"


# --- the commands --------------------------------------------------------------------------

@pytest.fixture()
def clickhouse_env(tmp_path) -> dict[str, str]:
    return {"QUOTAFLOW_STATE_DIR": str(tmp_path / "state"), "QUOTAFLOW_SINK_METRICS_PORT": "0",
            "QUOTAFLOW_API_PORT": str(unused_port()),
            "QUOTAFLOW_CLICKHOUSE_URL": f"http://user:{PASSWORD}@127.0.0.1:{unused_port()}/db"}


@pytest.mark.parametrize("command", [["db", "migrate"], ["api"], ["sink"]])
def test_an_unreachable_clickhouse_is_reported_in_one_line_without_its_password(command, clickhouse_env):
    result = quotaflow(*command, env=clickhouse_env)
    assert result.returncode == 1
    assert_no_secret(result.stdout + result.stderr, PASSWORD)
    line = error_line(result)
    assert "cannot open ClickHouse at http://user:***@127.0.0.1:" in line, line


def test_the_clickhouse_connection_error_itself_carries_no_password():
    """What every caller (CLI, sink, query API export) gets from the client."""
    from quotaflow.schemas.clickhouse.client import ClickHouseUnavailable, connect

    password = "pw-only-in-this-test-7f3a"
    with pytest.raises(ClickHouseUnavailable) as failed:
        connect(f"http://user:{password}@127.0.0.1:{unused_port()}/db?password={password}")
    assert_no_secret(str(failed.value), password)
    assert str(failed.value).startswith("cannot open ClickHouse at http://user:***@127.0.0.1:")


def test_a_sink_started_by_the_stack_leaves_no_password_in_its_log(clickhouse_env):
    """As `quotaflow stack` and the demo start it: in the background, output to a log file."""
    from quotaflow.core.settings import Settings
    from quotaflow.deploy import stack

    settings = Settings(state_dir=clickhouse_env["QUOTAFLOW_STATE_DIR"], sink_metrics_port=0,
                        clickhouse_url=clickhouse_env["QUOTAFLOW_CLICKHOUSE_URL"])
    with pytest.raises(OperatorError) as failed:
        stack.start_pipeline_process(settings, "sink", env={**os.environ, **clickhouse_env}, timeout_s=60)
    assert_no_secret(str(failed.value), PASSWORD)
    logs = list(Path(clickhouse_env["QUOTAFLOW_STATE_DIR"], "logs").glob("*.log"))
    assert logs
    text = "".join(p.read_text() for p in logs)
    assert "cannot open ClickHouse at http://user:***@" in text
    assert_no_secret(text, PASSWORD)


def test_an_unreachable_redis_is_reported_in_one_line_without_its_password(tmp_path):
    env = {"QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{unused_port()}/0"}
    for command in (["org", "get", "acme"], ["key", "show", "acme", "acme-web"], ["enforcement", "status"]):
        result = quotaflow(*command, env=env)
        assert result.returncode == 1, result.stderr
        assert_no_secret(result.stdout + result.stderr, REDIS_PASSWORD)
        assert error_line(result).startswith("quotaflow: cannot reach Redis at redis://:***@127.0.0.1:")


def test_status_shows_where_services_are_without_their_passwords(tmp_path):
    env = {"QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_REDIS_URL": f"redis://:{REDIS_PASSWORD}@10.0.0.1:6379/0",
           "QUOTAFLOW_CLICKHOUSE_URL": f"https://user:{PASSWORD}@ch.example:8443/db?password={PASSWORD}"}
    result = quotaflow("stack", "status", env=env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr, PASSWORD, REDIS_PASSWORD)
    assert "redis://:***@10.0.0.1:6379/0" in result.stdout
    assert "https://user:***@ch.example:8443/db?password=***" in result.stdout


@pytest.mark.parametrize("env, variable", [
    ({"QUOTAFLOW_API_TOKENS": json.dumps({TOKEN: 5})}, "QUOTAFLOW_API_TOKENS"),
    ({"QUOTAFLOW_API_TOKENS": json.dumps({TOKEN + " x": "acme"})}, "QUOTAFLOW_API_TOKENS"),
    ({"QUOTAFLOW_API_TOKENS": f"{{{TOKEN}: acme}}"}, "QUOTAFLOW_API_TOKENS"),  # not JSON
    ({"QUOTAFLOW_API_TOKENS": json.dumps([TOKEN])}, "QUOTAFLOW_API_TOKENS"),
    ({"QUOTAFLOW_REDIS_URL": f"redis//:{PASSWORD}@127.0.0.1/0"}, "QUOTAFLOW_REDIS_URL"),
    ({"QUOTAFLOW_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:port/0"}, "QUOTAFLOW_REDIS_URL"),
    ({"QUOTAFLOW_CLICKHOUSE_URL": f"clickhouse://u:{PASSWORD}@127.0.0.1/db"}, "QUOTAFLOW_CLICKHOUSE_URL"),
    ({"QUOTAFLOW_CLICKHOUSE_URL": f"http://u:{PASSWORD}@127.0.0.1:99999/db"}, "QUOTAFLOW_CLICKHOUSE_URL"),
])
def test_a_bad_setting_is_named_in_one_line_and_its_value_never_shown(env, variable, tmp_path):
    result = quotaflow("stack", "status", env={"QUOTAFLOW_STATE_DIR": str(tmp_path), **env})
    assert result.returncode == 2
    assert_no_secret(result.stdout + result.stderr, PASSWORD, TOKEN)
    line = error_line(result)
    assert line.startswith(f"quotaflow: invalid configuration: {variable}"), line


def test_a_token_for_an_org_outside_the_id_rule_stops_the_api_naming_the_token_by_position(tmp_path):
    env = {"QUOTAFLOW_STATE_DIR": str(tmp_path), "QUOTAFLOW_API_PORT": str(unused_port()),
           "QUOTAFLOW_API_TOKENS": json.dumps({"ops-token-0123456789": "*", TOKEN: "acme}:x"})}
    result = quotaflow("api", env=env)
    assert result.returncode == 2
    assert_no_secret(result.stdout + result.stderr, TOKEN)
    assert "QUOTAFLOW_API_TOKENS: token #2" in error_line(result)


@pytest.mark.stack
def test_stack_up_with_an_unreachable_clickhouse_says_so_without_its_password(live_stack):
    result = quotaflow("stack", "up", env={"QUOTAFLOW_CLICKHOUSE_URL":
                                           f"http://user:{PASSWORD}@127.0.0.1:{unused_port()}/db"})
    assert result.returncode == 1
    assert_no_secret(result.stdout + result.stderr, PASSWORD)
    assert "cannot open ClickHouse at http://user:***@127.0.0.1:" in error_line(result)


def test_tokens_are_taken_as_clients_send_them_after_bearer():
    from pydantic import ValidationError

    from quotaflow.core.settings import Settings

    assert Settings(api_tokens={"a!b#c$d%e&f'g(h)": "acme", "x" * 512: "*"}).api_tokens  # visible ASCII
    for bad in ("", "with space", "tab\there", "caf\u00e9-token", "x" * 513):
        with pytest.raises(ValidationError):
            Settings(api_tokens={bad: "acme"})
