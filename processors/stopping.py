"""The processor's shutdown as its retry loops see it.

A batch waiting for Redis or the broker to come back retries until they do; asked to
stop meanwhile, it gives up instead: the batch is not acknowledged, so it is read
again after the restart (at-least-once, idempotent effect). Without this, Faust's
shutdown waits for the batch to be acknowledged, and a SIGTERM during an outage
waited as long as the outage.
"""

from __future__ import annotations

import asyncio

from quotaflow.core.retry import GaveUp, pause_until

_requested = asyncio.Event()


class Stopped(GaveUp):
    """The processor is stopping: the batch in progress is abandoned, unacknowledged."""


def request() -> None:
    _requested.set()


# Sleeps between retries (core/retry.py); raises Stopped at once if a stop is (or gets) requested.
pause = pause_until(_requested, Stopped)
