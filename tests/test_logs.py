"""The logging setup's filter of expected transients (quotaflow/core/logs.py): aiokafka's
"group coordinator not available" on every start is lowered from error to info, real
errors keep their level, and a coordinator that stays unavailable is an error again."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from quotaflow.core.logs import ExpectedTransients, JsonFormatter, RedactSecrets

COORDINATOR = "aiokafka.consumer.group_coordinator"
NOT_AVAILABLE = "[Error 15] GroupCoordinatorNotAvailableError"


@pytest.fixture()
def capture():
    """A logger named like aiokafka's, writing JSON lines through the filters; a clock to move."""
    now = [0.0]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ExpectedTransients(burst=3, window_s=60, clock=lambda: now[0]))
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(COORDINATOR), logging.getLogger("aiokafka"), logging.getLogger("quotaflow.test")]
    saved = [(lg.level, lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # as logging_dict sets it unless debugging
    logging.getLogger(COORDINATOR).setLevel(logging.NOTSET)

    def lines() -> list[tuple[str, str]]:
        return [(d["level"], d["msg"]) for d in map(json.loads, stream.getvalue().splitlines())]

    yield now, lines
    for lg, (level, handlers, propagate) in zip(loggers, saved):
        lg.setLevel(level)
        lg.handlers, lg.propagate = handlers, propagate


def test_the_coordinator_not_available_at_start_is_no_error(capture):
    now, lines = capture
    log = logging.getLogger(COORDINATOR)
    for _ in range(3):
        log.error("Group Coordinator Request failed: %s", NOT_AVAILABLE)
    log.error("Heartbeat failed: %r", "[Error 27] RebalanceInProgressError")  # another error: as it is
    logging.getLogger("aiokafka").error("Unable connect to node with id 1: [Errno 111] Connect call failed")
    logging.getLogger("quotaflow.test").error("our own line naming %s keeps its level", NOT_AVAILABLE)
    assert lines() == [
        ("error", "Heartbeat failed: '[Error 27] RebalanceInProgressError'"),
        ("error", "Unable connect to node with id 1: [Errno 111] Connect call failed"),
        ("error", f"our own line naming {NOT_AVAILABLE} keeps its level"),
    ]


def test_a_coordinator_that_stays_unavailable_is_an_error_again(capture):
    now, lines = capture
    log = logging.getLogger(COORDINATOR)
    for second in range(5):  # past the burst of 3 within 60 s
        now[0] = second
        log.error("Group Coordinator Request failed: %s", NOT_AVAILABLE)
    assert lines() == [("error", f"Group Coordinator Request failed: {NOT_AVAILABLE}")] * 2
    now[0] = 1000  # a minute later without any: transient again
    log.error("Group Coordinator Request failed: %s", NOT_AVAILABLE)
    assert len(lines()) == 2


def test_when_aiokafka_logs_info_the_line_is_shown_as_info(capture):
    now, lines = capture
    logging.getLogger("aiokafka").setLevel(logging.DEBUG)
    logging.getLogger(COORDINATOR).error("Group Coordinator Request failed: %s", NOT_AVAILABLE)
    assert lines() == [("info", f"Group Coordinator Request failed: {NOT_AVAILABLE}")]


def test_every_process_gets_the_filter_from_the_logging_setup():
    """As the CLI and the Faust worker configure logging (logging_dict)."""
    script = textwrap.dedent(f"""
        import logging
        from quotaflow.core.logs import setup_logging
        setup_logging("INFO", "json")
        logging.getLogger("{COORDINATOR}").error("Group Coordinator Request failed: %s", "{NOT_AVAILABLE}")
        logging.getLogger("aiokafka").error("Unable to update metadata from [1]")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=os.environ)
    assert result.returncode == 0, result.stderr
    assert [(d["level"], d["msg"]) for d in map(json.loads, result.stderr.splitlines())] == [
        ("error", "Unable to update metadata from [1]")]
