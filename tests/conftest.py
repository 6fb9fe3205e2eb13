"""Fixtures shared by the test modules: the real local stack (Kafka, Redis, ClickHouse
engine) started once per session on ports of its own, pipeline processes started per
test, and an embedded engine of a test's own.

Helpers shared by several modules live in modules of their own (tests/pipeline.py,
tests/storage.py, tests/event_docs.py); a test module never imports from another.

Ports derive from QUOTAFLOW_TEST_PORT_BASE (default 29000) so two sessions on one
machine can run side by side; downloads are shared with the demo's cache. Under
pytest-xdist each worker has a stack of its own, 25 ports further per worker: the ports
of a worker (base + 92, 93, 110, 111, 120, 130 and the few above it tests take, 379, a
cluster node's at + 395, a spare stack's at + 592 to + 895) and those of up to 3 more
never meet, and stay below base + 1000.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from quotaflow.deploy import stack

ROOT = Path(__file__).resolve().parent.parent
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))  # 0 without xdist
BASE = int(os.environ.get("QUOTAFLOW_TEST_PORT_BASE", "29000")) + 25 * WORKER
if "QUOTAFLOW_TEST_STATE_DIR" in os.environ:  # as given; a worker after the first beside it
    STATE_DIR = Path(os.environ["QUOTAFLOW_TEST_STATE_DIR"] + (f"-{WORKER}" if WORKER else ""))
else:
    STATE_DIR = ROOT / f".quotaflow-test-{BASE}"
CACHE_DIR = Path(os.environ.get("QUOTAFLOW_CACHE_DIR", ROOT / ".quotaflow" / "cache"))

# Set before anything reads settings (get_settings is cached); subprocesses inherit them.
_ENV_BEFORE = dict(os.environ)
os.environ.update(stack.isolated_env(BASE, STATE_DIR, CACHE_DIR))
os.environ["QUOTAFLOW_LOG_FORMAT"] = "json"
for var in ("QUOTAFLOW_KAFKA_BOOTSTRAP", "QUOTAFLOW_REDIS_URL", "QUOTAFLOW_CLICKHOUSE_URL"):
    os.environ.pop(var, None)

from quotaflow.core.settings import Settings, get_settings  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        # pytest-xdist's controller runs no test. Its workers start with its environment
        # and then set their own: without this, each would carry the first worker's stack
        # variables in its /proc environ, and look like a process of that stack.
        os.environ.clear()
        os.environ.update(_ENV_BEFORE)


@pytest.fixture(scope="session")
def port_base() -> int:
    """This session's port base: the stack's ports are above it (stack.isolated_env); a
    test needing a fixed port of its own takes one between them (e.g. port_base + 395)."""
    return BASE


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def live_stack(settings: Settings):
    """The stack, started from a clean state dir, stopped at the end of the session."""
    stack.down(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    try:
        stack.up(settings)
    except BaseException:  # what did start (Redis before a failed Kafka, say) must not outlive the run
        stack.down(settings)
        raise
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


@pytest.fixture()
def engine(tmp_path):
    """An embedded ClickHouse engine in a directory of this test's own (not the stack's),
    opened in the test process and closed after it (one engine path per process at a time)."""
    from quotaflow.schemas.clickhouse.client import connect

    client = connect(f"chdb://{tmp_path / 'clickhouse'}")
    yield client
    client.close()


@pytest.fixture()
def spare_stack_env(tmp_path):
    """QUOTAFLOW_* variables for a second stack of a test's own (a fresh broker, say),
    on ports apart from the session's, state under ``tmp_path / name``."""
    def env(name: str) -> dict[str, str]:
        return stack.isolated_env(BASE + 500, tmp_path / name, CACHE_DIR)

    return env
