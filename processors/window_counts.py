"""Counts of one subject (an API key or an org: subjects.py) in every window of the policy:
pure logic.

The state is a small dict, stored in a Faust table (and so in its changelog):

    {"p": partition, "o": position, # the source event that last changed it (record offset, index)
     "m": the subject's clock (ms), # the latest event time seen, each capped by its record's arrival
     "b": [[[bucket_start, count], ...], ...]}  # per window, ascending

After a crash Kafka redelivers records whose effect may already be in the
changelog; ``p``/``o`` recognise their events, so nothing is counted twice. Time is
event time, capped by the time the broker received the event's record (never the
wall clock), so replaying the same records gives the same state, and an event
stamped in the future cannot push the clock past the present: it would close the
current windows for every later event. An event is late for a window when its
bucket stopped mattering more than the grace period ago by the subject's clock: it
is then not counted there (it may still count in longer windows).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Sequence, TypedDict

from quotaflow.schemas.limits import Policy

COUNTED = "counted"
LATE = "late"  # missed at least one window
REDELIVERED = "redelivered"


class SubjectState(TypedDict):
    p: int
    o: int
    m: int
    b: list[list[list[int]]]


def apply_event(state: SubjectState | None, ts_ms: int, partition: int, position: int,
                policy: Policy, clock_ms: int | None = None) -> tuple[str, SubjectState | None]:
    """The outcome of one event and the subject's state after it (None when unchanged).
    ``clock_ms``: how far the event moves the subject's clock (its time, capped by its
    record's arrival; its time when None). The state given is updated in place: this
    runs for every event of every subject."""
    if state is not None and state["p"] == partition and position <= state["o"]:
        return REDELIVERED, None
    moved = ts_ms if clock_ms is None else clock_ms
    if state is None or len(state["b"]) != len(policy.windows):
        state = {"p": partition, "o": position, "m": moved, "b": [[] for _ in policy.windows]}
    clock = max(state["m"], moved)
    outcome = COUNTED
    for (bucket_ms, retained), buckets in zip(policy.buckets, state["b"], strict=True):
        keep_after = clock - retained
        _drop_closed(buckets, bucket_ms, keep_after)
        start = ts_ms - ts_ms % bucket_ms
        if start + bucket_ms <= keep_after:
            outcome = LATE
        else:
            _add(buckets, start, 1)
    state["p"], state["o"], state["m"] = partition, position, clock
    return outcome, state


def _drop_closed(buckets: list[list[int]], bucket_ms: int, keep_after: int) -> None:
    while buckets and buckets[0][0] + bucket_ms <= keep_after:  # ascending: drop from the front
        buckets.pop(0)


def _add(buckets: list[list[int]], start: int, n: int) -> None:
    """Count n in the bucket starting at start, keeping the buckets ascending."""
    if buckets and buckets[-1][0] == start:  # the usual case: the newest bucket
        buckets[-1][1] += n
    elif not buckets or buckets[-1][0] < start:
        buckets.append([start, n])
    else:
        i = bisect.bisect_left(buckets, [start, 0])
        if buckets[i][0] == start:
            buckets[i][1] += n
        else:
            buckets.insert(i, [start, n])


def apply_events(state: SubjectState | None, ts_ms: Sequence[int], partition: int, positions: Sequence[int],
                 policy: Policy, clocks: Sequence[int] | None = None) -> tuple[dict[str, int], SubjectState | None]:
    """apply_event for a run of events of one subject from one partition, in position order:
    the outcomes counted by kind, and the same state as applying them one by one.
    ``clocks``: per event, apply_event's clock_ms (None: their times).

    The usual run (none of its events late by the clock at its end, so none late by the
    clock at its own time either) is counted per bucket, not per event."""
    outcomes: dict[str, int] = {}
    if clocks is None:
        clocks = ts_ms
    if state is not None and state["p"] == partition:
        skip = bisect.bisect_right(positions, state["o"])  # a redelivered prefix
        if skip:
            outcomes[REDELIVERED] = skip
            ts_ms, positions, clocks = ts_ms[skip:], positions[skip:], clocks[skip:]
    if not ts_ms:
        return outcomes, None
    fresh = state is None or len(state["b"]) != len(policy.windows)  # apply_event starts such a state anew
    if len(ts_ms) == 1:
        oldest = newest = ts_ms[0]
        latest = clocks[0]
    else:
        oldest, newest, latest = min(ts_ms), max(ts_ms), max(clocks)
    clock = latest if fresh or latest > state["m"] else state["m"]
    for bucket_ms, retained in policy.buckets:
        if oldest - oldest % bucket_ms + bucket_ms <= clock - retained:  # some may be late: the exact way
            for ts, position, moved in zip(ts_ms, positions, clocks, strict=True):
                outcome, changed = apply_event(state, ts, partition, position, policy, moved)
                state = changed if changed is not None else state
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            return outcomes, state
    if fresh:
        state = {"p": partition, "o": positions[0], "m": clock, "b": [[] for _ in policy.windows]}
    for (bucket_ms, retained), buckets in zip(policy.buckets, state["b"]):
        if buckets and buckets[0][0] + bucket_ms <= clock - retained:
            _drop_closed(buckets, bucket_ms, clock - retained)
        first, last = oldest - oldest % bucket_ms, newest - newest % bucket_ms
        if first == last:
            _add(buckets, first, len(ts_ms))
        else:
            for start, n in sorted(Counter([ts - ts % bucket_ms for ts in ts_ms]).items()):
                _add(buckets, start, n)
    state["p"], state["o"], state["m"] = partition, positions[-1], clock
    outcomes[COUNTED] = len(ts_ms)
    return outcomes, state
