"""The one retry policy of every stage: an operation is tried again after a failure,
with exponential backoff and full jitter (tenacity's ``wait_random_exponential``:
each wait drawn between 0 and min(max_s, first_s * 2**n), so processes retrying
the same outage do not come back in step), one log line per failure, and a way to
give up when the process is stopping.

    await retry(op, "redis write", on=(RedisError, OSError), pause=stopping.pause)

logs ``{"msg": "redis write failed, retrying", "what": "redis write", "error": ...,
"retry_in_s": ...}`` before each wait. What a loop catches stays the caller's choice
(``on``, and ``unless`` for errors of those types that must not be retried); an error
it does not catch, or the last one when ``give_up_after_s`` has passed, is raised
as it is.

Stopping: ``pause`` sleeps between attempts. ``pause_until(event)`` returns one that
raises GaveUp instead of sleeping once the event is set, and cuts a sleep short when
it gets set: a stage asked to stop during an outage stops within moments instead of
waiting for the outage to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, stop_never
from tenacity import wait_random_exponential

log = logging.getLogger(__name__)
T = TypeVar("T")
Pause = Callable[[float], Awaitable[None]]

FIRST_S = 0.1  # the first wait is at most this; each next one at most twice the one before
MAX_S = 5.0  # no wait is longer (a call site may choose another cap)


class GaveUp(Exception):
    """A retry loop gave up because its process is stopping (see pause_until)."""


def pause_until(stop: asyncio.Event, gave_up: type[GaveUp] = GaveUp) -> Pause:
    """A pause between attempts that raises ``gave_up`` at once if ``stop`` is (or gets)
    set, instead of sleeping on."""

    async def pause(seconds: float) -> None:
        if not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
        if stop.is_set():
            raise gave_up

    return pause


async def retry(op: Callable[[], Awaitable[T]], what: str, *,
                on: type[BaseException] | tuple[type[BaseException], ...],
                unless: Callable[[BaseException], bool] | None = None,
                first_s: float = FIRST_S, max_s: float = MAX_S, give_up_after_s: float | None = None,
                pause: Pause = asyncio.sleep, level: int = logging.WARNING,
                logger: logging.Logger | None = None, extra: dict[str, Any] | None = None) -> T:
    """op's answer, op being called again after each failure it raises of a type in
    ``on`` (and for which ``unless`` is not true). ``what`` names the operation in the
    log line; ``extra`` adds fields to it; ``logger``: the caller's (this module's when None).
    Raises what op raises otherwise, its last error once ``give_up_after_s`` has
    passed, and what ``pause`` raises (GaveUp: the process is stopping)."""
    out = logger or log

    def retried(exc: BaseException) -> bool:
        return isinstance(exc, on) and not (unless is not None and unless(exc))

    def failed(state: RetryCallState) -> None:
        if out.isEnabledFor(level):
            error = state.outcome.exception() if state.outcome is not None else None
            out.log(level, f"{what} failed, retrying",
                    extra={"what": what, "error": str(error)[:500] or repr(error),
                           "retry_in_s": round(state.upcoming_sleep, 3), **(extra or {})})

    retrying = AsyncRetrying(
        retry=retry_if_exception(retried),
        wait=wait_random_exponential(multiplier=first_s, max=max_s),
        stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
        sleep=pause,
        before_sleep=failed,
        reraise=True,
    )

    async def attempt() -> T:  # op may be a lambda returning an awaitable: tenacity awaits coroutine functions only
        return await op()

    return await retrying(attempt)
