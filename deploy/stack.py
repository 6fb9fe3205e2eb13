"""The local stack: Kafka, Redis and ClickHouse on 127.0.0.1, state under one directory.

Services given by URL (QUOTAFLOW_KAFKA_BOOTSTRAP, QUOTAFLOW_REDIS_URL,
QUOTAFLOW_CLICKHOUSE_URL pointing elsewhere) are used as they are, not started.
"""

from __future__ import annotations

import sys
import time
import urllib.error
from pathlib import Path

from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import redact
from quotaflow.core.settings import Settings
from quotaflow.deploy import clickhouse, kafka, redis, redis_cluster, supervise
from quotaflow.deploy.procs import Proc, port_open, running_as, started_at, stop_pid, tail, wait_until
from quotaflow.deploy.topics import ensure_topics_sync

# Pipeline processes the demo (or an operator, `quotaflow stack start`) starts next to
# the stack, each under a supervisor that restarts it (deploy/supervise.py).
PIPELINE = ("processor", "sink", "alerts")
# What `quotaflow supervise NAME` runs: `quotaflow <argv>`.
STAGE_ARGV = {"processor": ["processor"], "sink": ["sink"], "alerts": ["alerts", "run"]}
# Stages their supervisor keeps a standby of (deploy/supervise.py), started once the running
# one has been up this long: the alerts stage, whose alerts wait for its restarts.
STANDBY_AFTER_S = {"alerts": 10.0}


def isolated_env(port_base: int, state_dir: Path, cache_dir: Path, brokers: int = 1,
                 redis_cluster: bool = False) -> dict[str, str]:
    """QUOTAFLOW_* variables for a stack of its own (tests, benchmarks) on ports
    port_base+N, sharing the download cache. With ``brokers`` > 1, broker n listens on
    port_base + 92 + 100*(n-1), its controller on port_base + 93 + 100*(n-1) (+ 192/193,
    + 292/293: KAFKA_BROKER_PORT_STEP in core/settings.py), ports no stack of a base up to
    75 ports away uses (test workers are 25 apart)."""
    env = {
        "QUOTAFLOW_STATE_DIR": str(state_dir),
        "QUOTAFLOW_CACHE_DIR": str(cache_dir),
        "QUOTAFLOW_KAFKA_PORT": str(port_base + 92),
        "QUOTAFLOW_KAFKA_CONTROLLER_PORT": str(port_base + 93),
        "QUOTAFLOW_REDIS_PORT": str(port_base + 379),
        "QUOTAFLOW_PROCESSOR_METRICS_PORT": str(port_base + 110),
        "QUOTAFLOW_SINK_METRICS_PORT": str(port_base + 111),
        "QUOTAFLOW_ALERTS_METRICS_PORT": str(port_base + 115),
        "QUOTAFLOW_API_PORT": str(port_base + 120),
        "QUOTAFLOW_GATEWAY_PORT": str(port_base + 130),
        "QUOTAFLOW_ADMIN_PORT": str(port_base + 140),
    }
    if brokers != 1:
        env["QUOTAFLOW_KAFKA_BROKERS"] = str(brokers)
    if redis_cluster:
        env["QUOTAFLOW_REDIS_CLUSTER"] = "true"
    return env


def pipeline_proc(settings: Settings, name: str) -> Proc:
    return Proc(name, settings.state_dir / "run")


def metrics_port(settings: Settings, name: str) -> int:
    return {"processor": settings.processor_metrics_port, "sink": settings.sink_metrics_port,
            "alerts": settings.alerts_metrics_port}[name]


def pipeline_log(settings: Settings, name: str):
    return settings.state_dir / "logs" / f"{name}.log"


def stage_ready(settings: Settings, name: str) -> bool:
    """The stage reports itself ready (partitions assigned) on its /metrics."""
    from quotaflow.core import metrics

    try:
        return metrics.scrape(metrics_port(settings, name)).get(f"quotaflow_{name}_ready") == 1.0
    except (urllib.error.URLError, OSError):
        return False


def pipeline_state(settings: Settings, name: str) -> supervise.State | None:
    """What the stage's supervisor last recorded (the stage's pid, restarts, last
    exit), while that supervisor runs."""
    proc = pipeline_proc(settings, name)
    if (pid := proc.pid()) is None:
        return None
    state = supervise.State.read(proc.state_file)
    return state if state is not None and state.supervisor_pid == pid else None


def start_pipeline_process(settings: Settings, name: str, env: dict | None = None, timeout_s: float = 90) -> int:
    """Run ``quotaflow <name>`` in the background under ``quotaflow supervise <name>``,
    which restarts it with backoff whenever it exits unasked; return the stage's own pid
    once it reports itself ready. A stage that exits before it is ready has failed to
    start: it is stopped, not restarted, and the error shows its log."""
    proc = pipeline_proc(settings, name)
    if (pid := proc.pid()) is not None:
        raise OperatorError(f"a {name} is already running (pid {pid}); stop it first with 'quotaflow stack down'")
    proc.start([sys.executable, "-m", "quotaflow", "supervise", name], pipeline_log(settings, name),
               marker=f"quotaflow supervise {name}", env=env)

    def exited() -> bool:
        state = pipeline_state(settings, name)
        return proc.pid() is None or (state is not None and state.restarts > 0)

    if not wait_until(lambda: exited() or stage_ready(settings, name), timeout_s) or exited():
        state = supervise.State.read(proc.state_file)
        failed = exited()
        stop_pipeline_process(settings, name)
        if not failed:
            why = f"did not become ready within {timeout_s:g} s"
        elif state is not None and state.last_exit is not None:
            why = f"exited at start ({supervise.describe_exit(state.last_exit)})"
        else:
            why = "exited at start"
        raise OperatorError(f"the {name} {why}; log:\n{tail(pipeline_log(settings, name))}")
    state = pipeline_state(settings, name)
    return state.pid if state is not None and state.pid is not None else proc.pid()


def wait_restarted(settings: Settings, name: str, after: int, timeout_s: float = 90) -> int:
    """Wait until the supervisor has restarted the stage (more than ``after`` restarts
    so far) and the new process is ready; return its pid."""

    def restarted() -> bool:
        state = pipeline_state(settings, name)
        return (state is not None and state.restarts > after and state.status == "running"
                and stage_ready(settings, name))

    if not wait_until(restarted, timeout_s):
        raise OperatorError(f"the {name} was not restarted and ready within {timeout_s:g} s; "
                         f"log:\n{tail(pipeline_log(settings, name))}")
    return pipeline_state(settings, name).pid


def stop_pipeline_process(settings: Settings, name: str) -> bool:
    """Stop the stage's supervisor, which stops the stage (SIGTERM, SIGKILL after a
    timeout) and does not restart it. True if something was stopped."""
    proc = pipeline_proc(settings, name)
    state = supervise.State.read(proc.state_file)
    stopped = proc.stop()
    # The stage gets SIGTERM from its supervisor, or from the kernel if the supervisor
    # died first (PR_SET_PDEATHSIG); one that still runs is stopped here, so that
    # nothing outlives `stack down`. Its start time tells it from a process that got
    # its pid later (another stack's stage, say).
    if (state is not None and state.pid is not None and running_as(state.pid, f"quotaflow {name}")
            and abs((started_at(state.pid) or 0) - state.up_since) < 5):
        stop_pid(state.pid, 30, group=False)
        stopped = True
    return stopped


def up(settings: Settings) -> list[str]:
    """Start what is not running; return the names of the services started now."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    started = []
    if settings.redis_is_local and _start_redis(settings):
        started.append("redis")
    if settings.kafka_is_local and kafka.start(settings):
        started.append("kafka")
    ensure_topics_sync(settings)
    clickhouse.prepare(settings)
    return started


def _start_redis(settings: Settings) -> bool:
    """The single redis-server, or the Redis Cluster's nodes: not both (node 1 takes the
    single one's port)."""
    if settings.redis_cluster:
        if redis.proc(settings).pid() is not None:
            raise OperatorError(f"a single redis-server runs in {settings.state_dir}, not the Redis Cluster of "
                                f"QUOTAFLOW_REDIS_CLUSTER; stop it first with 'quotaflow stack down'")
        return redis_cluster.start(settings)
    if redis_cluster.running_nodes(settings):
        raise OperatorError(f"a Redis Cluster runs in {settings.state_dir}; set QUOTAFLOW_REDIS_CLUSTER=true "
                            f"to use it, or stop it first with 'quotaflow stack down'")
    return redis.start(settings)


def down(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop the pipeline processes and services (all, or those named); return what was stopped."""
    stopped = []
    for name in PIPELINE:
        if (only is None or name in only) and stop_pipeline_process(settings, name):
            stopped.append(name)
    if (only is None or "kafka" in only) and kafka.stop(settings):
        stopped.append("kafka")
    if (only is None or "redis" in only) and any([redis.stop(settings), redis_cluster.stop(settings)]):
        stopped.append("redis")
    return stopped


def status(settings: Settings) -> list[tuple[str, bool, str]]:
    """(name, running, where) for each part."""
    out = []
    running = kafka.running_nodes(settings) if settings.kafka_is_local else []
    configured = kafka.nodes(settings)
    if running and not {n.proc.name for n in running} & {n.proc.name for n in configured}:
        # Started with another QUOTAFLOW_KAFKA_BROKERS (stack up --brokers 3): show what runs.
        configured = kafka.nodes(settings, 1 if running[0].proc.name == "kafka" else kafka.cluster_size(settings))
    if settings.kafka_is_local and len(configured) == 1:
        pid = configured[0].proc.pid()
        where = f"Apache Kafka {kafka.KAFKA_VERSION} (KRaft) on 127.0.0.1:{configured[0].port}"
        out.append(("kafka", pid is not None, f"{where}, pid {pid}" if pid else where))
    elif settings.kafka_is_local:
        for node in configured:
            pid = node.proc.pid()
            where = (f"Apache Kafka {kafka.KAFKA_VERSION} (KRaft) broker {node.n} of {len(configured)} on "
                     f"127.0.0.1:{node.port}, controller :{node.controller_port}, data in {node.data}")
            out.append((node.proc.name, pid is not None, f"{where}, pid {pid}" if pid else where))
    else:
        reachable = all(port_open(int(h.rsplit(":", 1)[1]), h.rsplit(":", 1)[0])
                        for h in settings.kafka_bootstrap.split(","))
        out.append(("kafka", reachable, f"external broker {settings.kafka_bootstrap}"))
    if settings.redis_is_local and (settings.redis_cluster or redis_cluster.running_nodes(settings)):
        everyone = redis_cluster.nodes(settings)
        role = redis_cluster.roles(everyone)
        for node in everyone:
            pid = node.proc.pid()
            r = role.get(node.n)
            kind = ("master" if r[0] == "master" else f"replica of 127.0.0.1:{r[1]}") if r else "not answering"
            where = (f"redis-server Redis Cluster node {node.n} on 127.0.0.1:{node.port} (bus :{node.bus_port}), "
                     f"{kind}, data in {node.data}")
            out.append((f"redis-{node.n}", pid is not None, f"{where}, pid {pid}" if pid else where))
    elif settings.redis_is_local:
        pid = redis.proc(settings).pid()
        where = f"redis-server on 127.0.0.1:{settings.redis_port}, data in {settings.state_dir / 'redis'}"
        out.append(("redis", pid is not None, f"{where}, pid {pid}" if pid else where))
    else:
        out.append(("redis", True, f"external {redact(settings.redis_url)}"))
    if settings.clickhouse_embedded:
        out.append(("clickhouse", True, f"embedded engine (chDB) at {settings.clickhouse_url.removeprefix('chdb://')}"))
    else:
        out.append(("clickhouse", True, f"server {redact(settings.clickhouse_url)}"))
    for name in PIPELINE:
        pid = pipeline_proc(settings, name).pid()
        out.append((name, pid is not None, _stage_status(pipeline_state(settings, name), pid)))
    return out


def _stage_status(state: supervise.State | None, supervisor_pid: int | None) -> str:
    """``pid 4321, up 3 min 5 s (since ...), 1 restart, last exit code -9 (SIGKILL) at ...``"""
    if supervisor_pid is None:
        return "not started"
    if state is None:
        return f"pid {supervisor_pid}"  # a supervisor that has not written its state yet
    now = time.time()
    if state.status == "running":
        parts = [f"pid {state.pid}, up {_duration(now - state.up_since)} (since {_clock(state.up_since)})"]
    elif state.status == "restarting":
        parts = [f"restarting in {max(state.next_start_at - now, 0):.1f} s"]
    else:
        parts = [state.status]
    parts.append(f"{state.restarts} restart{'' if state.restarts == 1 else 's'}")
    if state.last_exit is not None:
        parts.append(f"last exit {supervise.describe_exit(state.last_exit)} at {_clock(state.last_exit_at)}")
    parts.append(f"supervisor pid {supervisor_pid}")
    return ", ".join(parts)


def _clock(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _duration(seconds: float) -> str:
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if s >= size:
            return f"{s // size} {unit} {s % size // sub_size} {sub}"
    return f"{s} s"
