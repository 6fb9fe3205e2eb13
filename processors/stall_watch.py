"""Ends a processor that was itself frozen (SIGSTOP, a paused VM, a host starved of CPU) long
enough that its group may have handed its partitions to another processor, or that its group
expelled while a batch was held up (``check_membership``).

The group takes a member's partitions once its heartbeats have stopped for its session
(processors/app.py SESSION_TIMEOUT_S). A processor frozen that long mid-batch resumes where
it was: its batch would then write counts and changelog records after its successor's, from
a state behind theirs. Redis refuses counts older than those it holds (write.lua); the
changelog cannot refuse a record, and a later recovery of the partition would start from the
stale one. What the process can see of a freeze is time: a thread of ours ticking every TICK_S sees it as a gap (the event loop may be busy
with a batch for seconds; a thread is not held up by that). A gap over half the session
means the process may have been expelled: it exits at once, acknowledging nothing it has in
flight (its supervisor starts it again; the partition's owner reads those records again).
The batch also looks before it writes anything (``check``): after a freeze, the loop may
resume the batch before the thread has ticked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

TICK_S = 0.25
EXIT_STALLED = 75  # EX_TEMPFAIL: start it again


def leave(why: str, **extra: object) -> None:
    """Exit now, without acknowledging or flushing anything: what is in flight may be stale."""
    log.error("%s: exiting without writing what it has in flight (a supervisor starts it again: "
              "quotaflow stack start)", why, extra={**extra, "exit_code": EXIT_STALLED})
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_STALLED)


def exit_stalled(gap_s: float) -> None:
    leave(f"the processor was frozen for {gap_s:.1f} s, long enough for its group to hand its partitions to "
          "another processor", gap_s=round(gap_s, 1))


def check_membership(live: int | None, assigned: int) -> None:
    """Before a batch writes: the group generation the consumer is in now (``live``, None when
    unknown) against the one its partitions were assigned in. Within a rebalance the batch
    in flight ends before the consumer rejoins (consumer.py waits for it), so it never sees
    the generation move; it moves under a batch only when the group expelled the consumer
    (-1: a batch held up, by a Redis it alone cannot reach say, past the rebalance timeout
    while the others rebalanced; EventsConsumer.confirm_membership asks the group), and
    then its partitions are another's."""
    if live is not None and live != assigned:
        leave(f"the processor's group moved on without it (generation {assigned}, now {live}): its "
              "partitions are another processor's", generation=assigned, now=live)


class StallWatch:
    def __init__(self, limit_s: float, on_stall: Callable[[float], None] = exit_stalled,
                 clock: Callable[[], float] = time.monotonic, tick_s: float = TICK_S):
        self.limit_s = limit_s
        self._on_stall = on_stall
        self._clock = clock
        self._tick_s = tick_s
        self.last = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)

    def start(self) -> None:
        self.last = self._clock()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        now = self._clock()
        gap = now - self.last
        self.last = now
        if gap > self.limit_s:
            self._on_stall(gap)

    def check(self) -> None:
        """Before a batch writes: a freeze the thread has not ticked since."""
        gap = self._clock() - self.last
        if gap > self.limit_s:
            self._on_stall(gap)

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            self.tick()
