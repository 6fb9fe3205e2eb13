"""The one retry policy (quotaflow/core/retry.py): pure logic, no server."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.retry import GaveUp, pause_until, retry
from quotaflow.processors import stopping


class Flaky:
    """Fails with the given errors, in order, then answers "ok"."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class Waits:
    """A pause that records each wait instead of sleeping."""

    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@settings(max_examples=50, deadline=None)
@given(failures=st.integers(0, 12), first_s=st.floats(0.01, 1.0), max_s=st.floats(0.05, 10.0))
def test_waits_grow_exponentially_with_jitter_under_their_cap(failures, first_s, max_s):
    op, waits = Flaky(*[ConnectionError("down")] * failures), Waits()
    assert asyncio.run(retry(op, "op", on=ConnectionError, first_s=first_s, max_s=max_s, pause=waits)) == "ok"
    assert op.calls == failures + 1 and len(waits.waits) == failures
    for n, wait in enumerate(waits.waits):
        assert 0 <= wait <= min(max_s, first_s * 2 ** n) + 1e-9, (n, wait)


def test_waits_are_jittered():
    waits = Waits()
    asyncio.run(retry(Flaky(*[OSError("down")] * 20), "op", on=OSError, first_s=1.0, max_s=1.0, pause=waits))
    assert len(set(waits.waits)) > 1  # capped at 1 s, yet not all the same: processes do not retry in step


def test_each_failure_is_logged_once_with_what_the_error_and_the_wait(caplog):
    waits = Waits()
    with caplog.at_level(logging.WARNING, logger="quotaflow.core.retry"):
        asyncio.run(retry(Flaky(OSError("refused"), OSError("reset")), "redis: write", on=OSError, pause=waits,
                          extra={"rows": 3}))
    lines = [r for r in caplog.records if r.name == "quotaflow.core.retry"]
    assert [r.getMessage() for r in lines] == ["redis: write failed, retrying"] * 2
    assert [(r.what, r.error, r.rows) for r in lines] == [("redis: write", "refused", 3), ("redis: write", "reset", 3)]
    assert [r.retry_in_s for r in lines] == [round(w, 3) for w in waits.waits]


def test_errors_not_caught_and_errors_excepted_are_raised_at_once():
    for op, kwargs in ((Flaky(ValueError("bad data")), {}),
                       (Flaky(PermissionError("refused")), {"unless": lambda e: isinstance(e, PermissionError)})):
        waits = Waits()
        with pytest.raises((ValueError, PermissionError)):
            asyncio.run(retry(op, "op", on=OSError, pause=waits, **kwargs))
        assert op.calls == 1 and waits.waits == []


def test_after_give_up_after_s_the_last_error_is_raised():
    async def always_down() -> None:
        raise TimeoutError("still down")

    async def main() -> None:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError, match="still down"):
            await retry(always_down, "op", on=TimeoutError, first_s=0.01, max_s=0.02, give_up_after_s=0.2)
        assert asyncio.get_running_loop().time() - started < 5

    asyncio.run(main())


def test_a_lambda_returning_an_awaitable_is_awaited():
    op = Flaky(OSError("down"))
    assert asyncio.run(retry(lambda: op(), "op", on=OSError, pause=Waits())) == "ok" and op.calls == 2


def test_a_stop_cuts_a_long_wait_short_and_gives_up():
    async def main() -> float:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        waiting, asked = asyncio.Event(), []
        inner = pause_until(stop)

        async def pause(seconds: float) -> None:
            asked.append(seconds)
            waiting.set()
            await inner(seconds)

        task = asyncio.ensure_future(retry(Flaky(*[OSError("down")] * 100), "op", on=OSError, first_s=600,
                                           max_s=600, pause=pause))
        await waiting.wait()  # resumed once the task is suspended in its wait
        assert asked[0] > 0
        started = loop.time()
        stop.set()
        with pytest.raises(GaveUp):
            await task
        return loop.time() - started

    assert asyncio.run(main()) < 1.0


def test_once_stopping_a_failure_gives_up_without_waiting():
    async def main() -> None:
        stop = asyncio.Event()
        stop.set()
        op = Flaky(OSError("down"))
        with pytest.raises(GaveUp):
            await retry(op, "op", on=OSError, first_s=60, max_s=60, pause=pause_until(stop))
        assert op.calls == 1

    asyncio.run(main())


def test_the_processors_stop_is_a_give_up_of_its_own():
    # app.py catches stopping.Stopped: the batch in progress is left unacknowledged
    assert issubclass(stopping.Stopped, GaveUp)
