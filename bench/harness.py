"""Shared by the benchmarks: a stack of their own, and figures printed as `name: value unit`.

Run a benchmark as `.venv/bin/python bench/NAME.py`; it brings up what it needs on
ports QUOTAFLOW_BENCH_PORT_BASE+N (default 27000: below the kernel's ephemeral ports, so a
client polling a port not listening yet cannot connect to itself), state in .quotaflow-bench-BASE/.
Machines are shared and noisy: every benchmark measures its baseline in the same run.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from quotaflow.deploy import stack

ROOT = Path(__file__).resolve().parent.parent
BASE = int(os.environ.get("QUOTAFLOW_BENCH_PORT_BASE", "27000"))

os.environ.update(stack.isolated_env(BASE, ROOT / f".quotaflow-bench-{BASE}",
                                     Path(os.environ.get("QUOTAFLOW_CACHE_DIR", ROOT / ".quotaflow" / "cache"))))

from quotaflow.core.settings import Settings, get_settings  # noqa: E402  (after the environment is set)


def up() -> Settings:
    """The stack, from an empty state dir: every run starts alike."""
    import shutil

    settings = get_settings()
    stack.down(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    stack.up(settings)
    return settings


async def publish_backlog(bootstrap: str, run: str, n: int, batch_events: int = 500) -> None:
    """n events of 200 orgs and 5,000 keys, ``batch_events`` to a record (1: one event a record,
    as kcat or Kafka Connect publish), flushed every 20,000: within the emitter's memory
    bound, and patient with a broker slowed by a shared machine. Every one is delivered."""
    from quotaflow.collector.emitter import Emitter
    from quotaflow.schemas.events import RequestEvent

    now = int(time.time() * 1000)
    async with Emitter(bootstrap, batch_events=batch_events, linger_ms=50, delivery_timeout_s=120) as emitter:
        for i in range(n):
            if i and i % 20_000 == 0:
                await emitter.flush()
            await emitter.emit(RequestEvent.new(
                event_id=str(uuid.uuid4()), ts_ms=now + i % 1000, org_id=f"{run}-o{i % 200}",
                api_key_id=f"{run}-k{i % 5000}", service="bench", endpoint="/v1/bench", method="GET", status=200,
                latency_ms=1.0, request_bytes=0, response_bytes=100, client_ip="192.0.2.9", user_agent="bench"))
        await emitter.flush()
    if emitter.failed:
        raise RuntimeError(f"{emitter.failed} of the backlog's {n} events were not delivered")


def report(name: str, value: float, unit: str) -> None:
    print(f"{name}: {value:.3f} {unit}", flush=True)
