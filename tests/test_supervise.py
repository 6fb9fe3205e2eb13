"""Supervised stages: a stage that exits unasked is restarted with growing, jittered
delays and says so in its log and in `quotaflow stack status`; a stop asked for
(SIGTERM to the supervisor, `stack down`) stops it without a restart, and nothing
outlives it.

First the supervisor itself, around a small child program (a real process: real
signals, real exits); then the processor and the sink on the real stack."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from quotaflow.core.errors import OperatorError
from quotaflow.deploy import kafka, stack
from quotaflow.deploy import redis as redis_service
from quotaflow.deploy.procs import alive
from quotaflow.deploy.supervise import Backoff, State, describe_exit
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from tests.pipeline import counted, event, publish, this_minute, unique, wait_for

# --- the backoff policy --------------------------------------------------------------


def test_delays_double_up_to_the_cap_and_start_over_after_a_healthy_run():
    b = Backoff(initial_s=1.0, max_s=60.0, healthy_s=60.0)
    assert [b.after_exit(5.0, rand=lambda: 0.0) for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.after_exit(60.0, rand=lambda: 0.999) == 0.0  # up a minute: restarted at once, a new series
    assert b.after_exit(1.0, rand=lambda: 0.0) == 0.5
    assert b.after_exit(1.0, rand=lambda: 0.0) == 1.0
    never = Backoff(initial_s=1.0, max_s=60.0, healthy_s=0.0)  # every exit starts a series: never at once
    assert [never.after_exit(0.0, rand=lambda: 0.0) for _ in range(3)] == [0.5, 0.5, 0.5]


@given(initial=st.floats(0.01, 10), cap=st.floats(1, 1000),
       exits=st.lists(st.tuples(st.floats(0, 200), st.floats(0, 1, exclude_max=True)), min_size=1, max_size=40))
@example(initial=1.0, cap=1000.0, exits=[(0.0, 0.9999999999999999), (0.0, 0.0)])  # rounding at r -> 1
def test_each_delay_is_jittered_within_its_ceiling_and_grows_until_capped(initial, cap, exits):
    b = Backoff(initial_s=initial, max_s=initial * cap, healthy_s=60.0)
    in_a_row, previous = 0, None
    for uptime, r in exits:
        delay = b.after_exit(uptime, rand=lambda: r)
        if uptime >= 60.0:  # after a healthy run: at once, and the next quick exit starts a series
            assert delay == 0.0
            in_a_row, previous = 0, delay
            continue
        in_a_row += 1
        ceiling = min(b.max_s, initial * 2 ** (in_a_row - 1))
        assert ceiling / 2 <= delay <= ceiling
        if in_a_row > 1 and previous < b.max_s / 2:  # below the cap: longer than the last, whatever the jitter
            assert delay > previous
        previous = delay


def test_exits_are_described_by_code_and_signal():
    assert describe_exit(-9) == "code -9 (SIGKILL)"
    assert describe_exit(-15) == "code -15 (SIGTERM)"
    assert describe_exit(3) == "code 3"
    assert describe_exit(0) == "code 0"


# --- the supervisor around a small child program -------------------------------------

CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys
    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    def note(what):
        with out.open("a") as f:
            f.write(f"{what} {os.getpid()}\\n")
    def on_term(*_):
        note("SIGTERM")
        sys.exit(0)
    crashed = out.with_suffix(".crashed")
    if mode == "crash-once" and not crashed.exists():  # the first run fails at once
        crashed.touch()
        sys.exit(3)
    if mode == "standby":  # as a stage does once it has imported what it needs
        from quotaflow.deploy.supervise import wait_if_standby
        note("imported")
        wait_if_standby()
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-sigterm" else on_term)
    note("started")
    while True:
        signal.pause()
""")

SUPERVISOR = textwrap.dedent("""
    import sys
    from pathlib import Path
    from quotaflow.deploy.supervise import Backoff, run
    from quotaflow.core.logs import setup_logging
    child, out, mode, state, stop_timeout = sys.argv[1:]
    setup_logging("INFO", "json")
    sys.exit(run("toy", [sys.executable, child, out, mode], Path(state), Backoff(0.05, 0.2, 60.0),
                 stop_timeout_s=float(stop_timeout), standby_after_s=0.2 if mode == "standby" else None))
""")


class Toy:
    """`toy` under a supervisor, as a detached process group like the stack's."""

    def __init__(self, tmp: Path, mode: str, stop_timeout_s: float = 5.0):
        (tmp / "child.py").write_text(CHILD)
        self.out, self.state_file, self.log = tmp / "child.out", tmp / "toy.state.json", tmp / "toy.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SUPERVISOR, str(tmp / "child.py"), str(self.out), mode, str(self.state_file),
                 str(stop_timeout_s)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent)

    def state(self) -> State | None:
        return State.read(self.state_file)

    def running(self, restarts: int) -> int:
        """Wait until the child runs after ``restarts`` restarts; its pid."""
        def ready() -> bool:
            s = self.state()
            return (s is not None and s.status == "running" and s.restarts == restarts
                    and f"started {s.pid}" in self.notes())
        wait_for(ready, 20, f"the child to run after {restarts} restarts", self.logs)
        return self.state().pid

    def notes(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def records(self) -> list[dict]:
        return [orjson.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture()
def toys(tmp_path):
    made: list[Toy] = []

    def make(mode: str, **kw) -> Toy:
        made.append(Toy(tmp_path, mode, **kw))
        return made[-1]

    yield make
    for toy in made:
        toy.kill_all()


RESTART_MSG = re.compile(r"toy exited with code (-?\d+)(?: \((\w+)\))?; restarting in (\d+\.\d) s, restart (\d+)")


def test_a_crash_and_a_kill_are_restarted_and_a_sigterm_stops_without_restart(toys):
    toy = toys("crash-once")
    first = toy.running(restarts=1)  # the first run exited with code 3 and was restarted
    os.kill(first, signal.SIGKILL)
    second = toy.running(restarts=2)
    assert second != first

    restarts = [r for r in toy.records() if RESTART_MSG.fullmatch(r["msg"])]
    assert [(r["exit_code"], r["signal"], r["restart"]) for r in restarts] == [(3, None, 1), (-9, "SIGKILL", 2)]
    assert [RESTART_MSG.fullmatch(r["msg"]).group(3) for r in restarts] == [f"{r['delay_s']:.1f}" for r in restarts]
    assert 0.025 <= restarts[0]["delay_s"] <= 0.05 <= restarts[1]["delay_s"] <= 0.1  # Backoff(0.05, ...)
    s = toy.state()
    assert (s.last_exit, s.restarts, s.supervisor_pid) == (-9, 2, toy.proc.pid)

    toy.proc.send_signal(signal.SIGTERM)
    assert toy.proc.wait(timeout=10) == 0
    assert f"SIGTERM {second}" in toy.notes()  # the stage was told, and shut down by itself
    assert not alive(second)
    s = toy.state()
    assert (s.status, s.pid, s.restarts, s.last_exit) == ("stopped", None, 2, 0)
    msgs = [r["msg"] for r in toy.records()]
    assert msgs[-2:] == [f"stopping toy (pid {second}): SIGTERM", "toy stopped (code 0)"]


def test_a_standby_takes_over_at_a_restart_a_dead_one_is_replaced_and_none_outlives_a_stop(toys):
    toy = toys("standby")

    def standby_waiting(other_than: int | None = None) -> int:
        def ready() -> bool:
            s = toy.state()
            return (s is not None and s.standby_pid not in (None, other_than)
                    and f"imported {s.standby_pid}" in toy.notes())
        wait_for(ready, 20, "a standby waiting", toy.logs)
        return toy.state().standby_pid

    first = toy.running(restarts=0)
    standby = standby_waiting()
    assert f"started {standby}" not in toy.notes()  # imported, waiting to be released
    os.kill(first, signal.SIGKILL)
    assert toy.running(restarts=1) == standby  # the standby took over
    assert f"toy started (pid {standby}) from its standby" in [r["msg"] for r in toy.records()]

    dead = standby_waiting(other_than=standby)  # the next one, once the running one was up 0.2 s
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: not alive(dead), 10, "the standby to die")
    os.kill(standby, signal.SIGKILL)
    third = toy.running(restarts=2)
    assert third != dead and f"toy started (pid {third})" in [r["msg"] for r in toy.records()]  # a fresh start

    last = standby_waiting(other_than=dead)
    toy.proc.send_signal(signal.SIGTERM)
    assert toy.proc.wait(timeout=10) == 0
    assert not alive(third) and not alive(last) and f"started {last}" not in toy.notes()
    assert (toy.state().status, toy.state().standby_pid) == ("stopped", None)


def test_a_stage_that_ignores_sigterm_is_killed_after_the_timeout(toys):
    toy = toys("ignore-sigterm", stop_timeout_s=0.5)
    pid = toy.running(restarts=0)
    toy.proc.send_signal(signal.SIGTERM)
    assert toy.proc.wait(timeout=10) == 0
    assert not alive(pid)
    assert [r["msg"] for r in toy.records()][-2:] == ["toy did not stop within 0.5 s; SIGKILL",
                                                      "toy stopped (code -9 (SIGKILL))"]
    assert toy.state().restarts == 0


def test_a_stage_whose_supervisor_dies_is_told_to_stop(toys):
    toy = toys("wait")
    pid = toy.running(restarts=0)
    toy.proc.send_signal(signal.SIGKILL)  # the supervisor alone
    toy.proc.wait()
    wait_for(lambda: not alive(pid), 10, "the orphaned stage to stop", toy.logs)
    assert f"SIGTERM {pid}" in toy.notes()  # PR_SET_PDEATHSIG: a clean stop, not left running


def test_supervise_has_help():
    result = subprocess.run([sys.executable, "-m", "quotaflow", "supervise", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: quotaflow supervise"), result.stderr


# --- the processor and the sink on the real stack ------------------------------------

STAGE_RESTART_MSG = r"{} exited with code -9 \(SIGKILL\); restarting in \d+\.\d s, restart {}"


def supervise_records(pipeline, name: str) -> list[dict]:
    """The supervisor's JSON log lines in the stage's log, from this test on."""
    return [r for r in (orjson.loads(line) for line in pipeline.logs(name, lines=100_000).splitlines()
                        if line.startswith("{")) if r.get("logger") == "quotaflow.supervise"]


def stack_status() -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "quotaflow", "stack", "status"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}


@pytest.mark.stack
def test_a_killed_processor_is_restarted_counts_again_and_status_says_so(live_stack, redis_client, pipeline):
    first = pipeline.start("processor")
    supervisor = pipeline.pid("processor")
    assert first != supervisor and pipeline.state("processor").pid == first
    os.kill(first, signal.SIGKILL)  # the stage itself, as the OOM killer would

    second = stack.wait_restarted(live_stack, "processor", after=0)  # its /metrics say ready again
    assert second != first and not alive(first)
    assert pipeline.pid("processor") == supervisor
    line = stack_status()["processor"]
    m = re.fullmatch(r"\s*processor\s+running\s+pid (\d+), up \d+ s \(since \S+\), 1 restart, "
                     r"last exit code -9 \(SIGKILL\) at \S+, supervisor pid (\d+)", line)
    assert m and (int(m.group(1)), int(m.group(2))) == (second, supervisor), line
    (restart,) = [r for r in supervise_records(pipeline, "processor") if "restarting" in r["msg"]]
    assert re.fullmatch(STAGE_RESTART_MSG.format("processor", 1), restart["msg"]), restart
    assert (restart["stage"], restart["signal"], restart["restart"]) == ("processor", "SIGKILL", 1)

    # The new processor does the work.
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "SCALE")
    window = this_minute()
    asyncio.run(publish(live_stack, [event(org, key, window + i) for i in range(40)]))
    wait_for(lambda: counted(redis_client, org, key, window) == 40, 60, "40 counted after the restart",
             pipeline.logs)


@pytest.mark.stack
def test_the_delay_grows_with_each_crash_in_a_row_up_to_the_cap(live_stack, pipeline):
    pipeline.start("sink", QUOTAFLOW_SUPERVISE_BACKOFF_INITIAL_S="0.2", QUOTAFLOW_SUPERVISE_BACKOFF_MAX_S="1.0")
    killed = []
    for n in range(5):  # kill each new sink as soon as it runs: a crash loop
        def running() -> bool:
            s = pipeline.state("sink")
            return s is not None and s.status == "running" and s.restarts == n
        wait_for(running, 30, f"sink run {n}", pipeline.logs)
        killed.append(pipeline.state("sink").pid)
        os.kill(killed[-1], signal.SIGKILL)
        wait_for(lambda: not alive(killed[-1]), 10, "the sink to die")
    stack.wait_restarted(live_stack, "sink", after=4)  # and after the crash loop it is up again

    restarts = [r for r in supervise_records(pipeline, "sink") if "restarting" in r["msg"]]
    assert [r["restart"] for r in restarts] == [1, 2, 3, 4, 5]
    for r in restarts:
        assert re.fullmatch(STAGE_RESTART_MSG.format("sink", r["restart"]), r["msg"]), r
    delays = [r["delay_s"] for r in restarts]
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert delays[0] < delays[1] < delays[2], delays  # doubling, whatever the jitter, below the cap
    assert pipeline.state("sink").restarts == 5


@pytest.mark.stack
def test_sigterm_to_the_supervisor_stops_the_stage_cleanly_without_restart(live_stack, pipeline):
    stage = pipeline.start("sink")
    supervisor = pipeline.pid("sink")
    os.kill(supervisor, signal.SIGTERM)
    wait_for(lambda: not alive(supervisor) and not alive(stage), 25, "the sink and its supervisor to stop",
             pipeline.logs)
    msgs = [r["msg"] for r in supervise_records(pipeline, "sink")]
    # The sink got SIGTERM and shut down by itself (code 0: not killed by a signal, no escalation).
    assert msgs[-2:] == [f"stopping sink (pid {stage}): SIGTERM", "sink stopped (code 0)"], msgs
    assert not [m for m in msgs if "restarting" in m or "SIGKILL" in m], msgs
    assert pipeline.pid("sink") is None and stack_status()["sink"].split()[1:] == ["stopped", "not", "started"]


@pytest.mark.stack
def test_a_stage_that_fails_at_start_is_a_clear_error_and_is_not_restarted(live_stack, pipeline):
    with socket.socket() as squatter:  # its metrics port is taken
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(OperatorError, match=r"(?s)the processor exited at start \(code 1\); log:\n.*in use"):
            pipeline.start("processor", QUOTAFLOW_PROCESSOR_METRICS_PORT=str(port))
    assert pipeline.pid("processor") is None  # the supervisor was stopped rather than left restarting it
    assert [r["exit_code"] for r in supervise_records(pipeline, "processor") if "restarting" in r["msg"]][:1] == [1]
    assert not [cmd for _, cmd in _ours(live_stack.state_dir) if "quotaflow" in cmd and "processor" in cmd]


def _ours(state_dir: Path) -> list[tuple[int, str]]:
    """Processes (other than this one) of our stack: started with our state dir in their
    environment or command line, or working in it (redis-server rewrites its title over
    its command line and environment, and works in its data dir)."""
    needle = f"QUOTAFLOW_STATE_DIR={state_dir}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if ((needle in (entry / "environ").read_bytes().split(b"\0") or str(state_dir) in cmdline
                 or Path(os.readlink(entry / "cwd")).is_relative_to(state_dir)) and alive(int(entry.name))):
                out.append((int(entry.name), cmdline))
        except OSError:  # gone, or not ours to read
            continue
    return out


@pytest.mark.stack
def test_stack_start_then_down_leaves_nothing_running(live_stack):
    logs = {name: stack.pipeline_log(live_stack, name) for name in stack.PIPELINE}
    offsets = {name: log.stat().st_size if log.exists() else 0 for name, log in logs.items()}
    result = subprocess.run([sys.executable, "-m", "quotaflow", "stack", "start"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reported = dict(re.findall(rf"^({'|'.join(stack.PIPELINE)}) started \(pid (\d+), supervised\)", result.stdout,
                               re.M))
    stages = [stack.pipeline_state(live_stack, name).pid for name in stack.PIPELINE]
    assert [int(reported[name]) for name in stack.PIPELINE] == stages, result.stdout
    supervisors = [stack.pipeline_proc(live_stack, name).pid() for name in stack.PIPELINE]
    servers = [kafka.proc(live_stack).pid(), redis_service.proc(live_stack).pid()]
    assert set(stages + supervisors + servers) <= {pid for pid, _ in _ours(live_stack.state_dir)}
    try:
        result = subprocess.run([sys.executable, "-m", "quotaflow", "stack", "down"], capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"stopped: {', '.join(stack.PIPELINE)}, kafka, redis"
        assert _ours(live_stack.state_dir) == []  # nothing left: no stage, supervisor, broker or Redis
        for name, log in logs.items():
            with open(log, "rb") as f:
                f.seek(offsets[name])
                text = f.read().decode(errors="replace")
            assert f"{name} stopped (code 0)" in text and "restarting" not in text, text[-3000:]
    finally:
        stack.down(live_stack)
        stack.up(live_stack)  # the session's stack, for the tests after this one
