"""The local stack: Kafka, Redis and ClickHouse on 127.0.0.1, state under one directory.

Services given by URL (QUOTAFLOW_KAFKA_BOOTSTRAP, QUOTAFLOW_REDIS_URL,
QUOTAFLOW_CLICKHOUSE_URL pointing elsewhere) are used as they are, not started.
"""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

from deploy import clickhouse, kafka, redis
from deploy.procs import Proc, StackError, port_open, tail, wait_until
from deploy.topics import ensure_topics_sync
from quotaflow.redact import redact
from quotaflow.settings import Settings

# Pipeline processes the demo (or an operator) starts next to the stack.
PIPELINE = ("processor", "sink")


def isolated_env(port_base: int, state_dir: Path, cache_dir: Path) -> dict[str, str]:
    """QUOTAFLOW_* variables for a stack of its own (tests, benchmarks) on ports
    port_base+N, sharing the download cache."""
    return {
        "QUOTAFLOW_STATE_DIR": str(state_dir),
        "QUOTAFLOW_CACHE_DIR": str(cache_dir),
        "QUOTAFLOW_KAFKA_PORT": str(port_base + 92),
        "QUOTAFLOW_KAFKA_CONTROLLER_PORT": str(port_base + 93),
        "QUOTAFLOW_REDIS_PORT": str(port_base + 379),
        "QUOTAFLOW_PROCESSOR_METRICS_PORT": str(port_base + 110),
        "QUOTAFLOW_SINK_METRICS_PORT": str(port_base + 111),
        "QUOTAFLOW_API_PORT": str(port_base + 120),
        "QUOTAFLOW_GATEWAY_PORT": str(port_base + 130),
    }


def pipeline_proc(settings: Settings, name: str) -> Proc:
    return Proc(name, settings.state_dir / "run")


def metrics_port(settings: Settings, name: str) -> int:
    return {"processor": settings.processor_metrics_port, "sink": settings.sink_metrics_port}[name]


def pipeline_log(settings: Settings, name: str):
    return settings.state_dir / "logs" / f"{name}.log"


def start_pipeline_process(settings: Settings, name: str, env: dict | None = None, timeout_s: float = 90) -> int:
    """Run ``quotaflow <name>`` in the background; return once it reports itself
    ready (partitions assigned) on its /metrics."""
    from quotaflow import metrics

    proc = pipeline_proc(settings, name)
    if (pid := proc.pid()) is not None:
        raise StackError(f"a {name} is already running (pid {pid}); stop it first with 'quotaflow stack down'")
    pid = proc.start([sys.executable, "-m", "quotaflow", name], pipeline_log(settings, name),
                     marker=f"quotaflow {name}", env=env)

    def ready() -> bool:
        try:
            return metrics.scrape(metrics_port(settings, name)).get(f"quotaflow_{name}_ready") == 1.0
        except (urllib.error.URLError, OSError):
            return False

    if not wait_until(lambda: proc.pid() is None or ready(), timeout_s) or proc.pid() is None:
        proc.stop()
        raise StackError(f"the {name} did not become ready; log:\n{tail(pipeline_log(settings, name))}")
    return pid


def up(settings: Settings) -> list[str]:
    """Start what is not running; return the names of the services started now."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    started = []
    if settings.redis_is_local and redis.start(settings):
        started.append("redis")
    if settings.kafka_is_local and kafka.start(settings):
        started.append("kafka")
    ensure_topics_sync(settings)
    clickhouse.prepare(settings)
    return started


def down(settings: Settings, only: list[str] | None = None) -> list[str]:
    """Stop the pipeline processes and services (all, or those named); return what was stopped."""
    stopped = []
    for name in PIPELINE:
        if (only is None or name in only) and pipeline_proc(settings, name).stop():
            stopped.append(name)
    if (only is None or "kafka" in only) and kafka.stop(settings):
        stopped.append("kafka")
    if (only is None or "redis" in only) and redis.stop(settings):
        stopped.append("redis")
    return stopped


def status(settings: Settings) -> list[tuple[str, bool, str]]:
    """(name, running, where) for each part."""
    out = []
    if settings.kafka_is_local:
        pid = kafka.proc(settings).pid()
        where = f"Apache Kafka {kafka.KAFKA_VERSION} (KRaft) on {settings.kafka_bootstrap}"
        out.append(("kafka", pid is not None, f"{where}, pid {pid}" if pid else where))
    else:
        reachable = all(port_open(int(h.rsplit(":", 1)[1]), h.rsplit(":", 1)[0])
                        for h in settings.kafka_bootstrap.split(","))
        out.append(("kafka", reachable, f"external broker {settings.kafka_bootstrap}"))
    if settings.redis_is_local:
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
        out.append((name, pid is not None, f"pid {pid}" if pid else "not started"))
    return out
