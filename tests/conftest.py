"""Fixtures: the real local stack (Kafka, Redis, ClickHouse engine) started once per
session on ports of its own, and pipeline processes started per test.

Ports derive from QUOTAFLOW_TEST_PORT_BASE (default 29000) so two sessions on one
machine can run side by side; downloads are shared with the demo's cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from quotaflow.deploy import stack

ROOT = Path(__file__).resolve().parent.parent
BASE = int(os.environ.get("QUOTAFLOW_TEST_PORT_BASE", "29000"))
STATE_DIR = Path(os.environ.get("QUOTAFLOW_TEST_STATE_DIR", ROOT / f".quotaflow-test-{BASE}"))
CACHE_DIR = Path(os.environ.get("QUOTAFLOW_CACHE_DIR", ROOT / ".quotaflow" / "cache"))

# Set before anything reads settings (get_settings is cached); subprocesses inherit them.
os.environ.update(stack.isolated_env(BASE, STATE_DIR, CACHE_DIR))
os.environ["QUOTAFLOW_LOG_FORMAT"] = "json"
for var in ("QUOTAFLOW_KAFKA_BOOTSTRAP", "QUOTAFLOW_REDIS_URL", "QUOTAFLOW_CLICKHOUSE_URL"):
    os.environ.pop(var, None)

from quotaflow.core.settings import Settings, get_settings  # noqa: E402


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def live_stack(settings: Settings):
    """The stack, started from a clean state dir, stopped at the end of the session."""
    stack.down(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    stack.up(settings)
    yield settings
    stack.down(settings)


@pytest.fixture()
def redis_client(live_stack):
    import redis

    client = redis.Redis.from_url(live_stack.redis_url)
    yield client
    client.close()


@pytest.fixture()
def pipeline(live_stack):
    """Start/stop the processor and the sink as real subprocesses (see tests/pipeline.py)."""
    from tests.pipeline import Pipeline

    p = Pipeline(live_stack)
    yield p
    p.stop_all()
