"""A stage run by hand in the foreground (`quotaflow processor`), as a new user would:
`quotaflow stack status` says it runs (it said "stopped"), `stack start` does not start a
second one next to it, and its log goes to the terminal (stderr), not to the stack's log
files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from quotaflow.deploy import stack
from tests.pipeline import wait_for

pytestmark = pytest.mark.stack


def quotaflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quotaflow", *args], capture_output=True, text=True, timeout=120,
                          env=os.environ)


def status_line(name: str) -> str:
    result = quotaflow("stack", "status")
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.split()[:1] == [name]]
    return line


def test_a_processor_started_by_hand_is_shown_running_and_logs_to_the_terminal(live_stack, pipeline, tmp_path):
    pipeline.stop_all()  # no supervised processor: the one below is the only one
    log = stack.pipeline_log(live_stack, "processor")
    log_size = log.stat().st_size if log.exists() else 0
    assert status_line("processor").split()[1] == "stopped"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {**os.environ, "QUOTAFLOW_LOG_LEVEL": "DEBUG"}  # so that it surely writes something
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "quotaflow", "processor"], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        wait_for(lambda: stack.stage_ready(live_stack, "processor"), 90, "the processor to be ready", err.read_text)
        line = status_line("processor")
        assert line.split()[1] == "running" and "started by hand (not supervised" in line, line
        assert f"metrics on 127.0.0.1:{live_stack.processor_metrics_port}" in line

        result = quotaflow("stack", "start", "processor")
        assert result.returncode == 1 and "a processor started by hand is running" in result.stderr, result
        assert stack.pipeline_proc(live_stack, "processor").pid() is None  # no supervisor started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert status_line("processor").split()[1:] == ["stopped", "not", "started"]
    assert '"logger":"faust' in err.read_text()  # its log: on stderr, JSON lines
    assert out.read_text() == ""
    assert (log.stat().st_size if log.exists() else 0) == log_size  # nothing in the stack's log file
