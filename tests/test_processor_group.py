"""Two processors in one consumer group, as when scaling out or when one is started by hand
beside the stack's: each counts the partitions it holds and knows its own backlog."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from quotaflow.core import metrics
from quotaflow.schemas.events import partition_of
from tests.pipeline import counted, event, publish, this_minute, unique, wait_for

pytestmark = pytest.mark.stack

BACKLOG = "quotaflow_processor_backlog_records"


def scrape(port: int) -> dict[str, float]:
    """The process's metrics; {} while it is not serving them yet."""
    try:
        return metrics.scrape(port)
    except OSError:
        return {}


def test_two_processors_of_one_group_count_every_partition_and_read_a_backlog_of_0(live_stack, redis_client,
                                                                                   pipeline, port_base, tmp_path):
    """A processor that was not the group's leader waited for ever for the partition count
    (Faust only knows it on the leader): it counted nothing on its partitions, and its
    backlog gauge read NaN."""
    pipeline.start("processor")
    second_port = port_base + 112
    err = tmp_path / "second.log"
    with open(err, "wb") as log:
        second = subprocess.Popen([sys.executable, "-m", "quotaflow", "processor"], stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL,
                                  env={**os.environ, "QUOTAFLOW_PROCESSOR_METRICS_PORT": str(second_port)})
    ports = (live_stack.processor_metrics_port, second_port)
    try:
        wait_for(lambda: scrape(second_port).get("quotaflow_processor_ready") == 1.0, 90,
                 "the second processor to hold partitions", err.read_text)
        orgs: dict[int, str] = {}  # partition -> an org counted there
        while len(orgs) < live_stack.events_partitions:
            org = unique("grp")
            orgs.setdefault(partition_of(org, live_stack.events_partitions), org)
        window = this_minute()
        asyncio.run(publish(live_stack, [event(org, "k", window + i) for org in orgs.values() for i in range(50)]))

        wait_for(lambda: all(counted(redis_client, org, "k", window) == 50 for org in orgs.values()), 90,
                 "every partition's org counted by whichever processor holds it",
                 lambda: f"{ {p: counted(redis_client, o, 'k', window) for p, o in orgs.items()} }\n"
                         f"{pipeline.logs()}\n--- second ---\n{err.read_text()[-3000:]}")
        wait_for(lambda: [scrape(port).get(BACKLOG) for port in ports] == [0.0, 0.0], 30,
                 "both processors' backlog gauges to read 0",
                 lambda: str([scrape(port).get(BACKLOG) for port in ports]))
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
