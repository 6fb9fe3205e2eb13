"""Two waits Faust builds into every start, cut for the alerts stage: an alert crossing while
the stage restarts (after a crash or SIGKILL) waits for all of them. Measured on a
restart under 10k events/s (bench/alerts.py, Faust's own info logs):

- ``TableManager.on_start`` sleeps 1 s before it registers the tables' changelogs (for
  apps that declare tables as their agents start). The alerts stage declares both its
  tables in create_app, before the worker starts: nothing to wait for.
- Faust's worker consumer asks the broker to hold each fetch up to 1.5 s for data
  (``fetch_max_wait_ms=1500``, fixed in faust's aiokafka driver). While the stage
  recovers its tables a fetch of the changelog partitions, quiet by then, is in flight;
  the events partitions, resumed after recovery, are fetched only once it returns: the
  first batch came 1.5 s after "Worker ready". FETCH_MAX_WAIT_MS bounds that wait. A
  fetch with data returns at once either way; when idle, a fetch every 100 ms per broker.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from faust.tables import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)
# Faust's services log under their class's module, this one for the classes here: as
# quiet as Faust's own (quotaflow/core/logs.py), warnings only.
log.setLevel(logging.WARNING)

FETCH_MAX_WAIT_MS = 100


class PromptTableManager(TableManager):
    """Faust's table manager without the second it sleeps before registering the tables."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when the consumer starts (AIOKafkaConsumer.start builds its
        # Fetcher from it); faust gives no setting for it.
        if hasattr(consumer, "_fetch_max_wait_ms"):
            consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        else:  # another aiokafka: keep faust's 1.5 s rather than fail
            log.warning("cannot bound the consumer's fetch wait (aiokafka changed)")
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


def prompt_transport(app: faust.App) -> None:
    """Give ``app`` (not started yet) a consumer whose fetches wait FETCH_MAX_WAIT_MS at most."""
    app.transport = _Transport(app.conf.broker_consumer, app)
