"""Per-key counts in fixed event-time windows: pure logic, no I/O.

The state of a key is a small dict, stored in a Faust table (and so in its
changelog): ``{"w": window start ms, "c": count, "p": partition, "o": offset}``.
``p``/``o`` are the source record that last changed the state: after a crash
Kafka redelivers records whose effect may already be in the changelog, and
those are recognised by their offset and not counted again.
"""

from __future__ import annotations

from typing import TypedDict


class KeyState(TypedDict):
    w: int
    c: int
    p: int
    o: int


def window_start(ts_ms: int, window_ms: int) -> int:
    return ts_ms - ts_ms % window_ms


def already_applied(state: KeyState | None, partition: int, offset: int) -> bool:
    return state is not None and state["p"] == partition and offset <= state["o"]


COUNTED = "counted"
REDELIVERED = "redelivered"
LATE = "late"


def apply_event(state: KeyState | None, ts_ms: int, partition: int, offset: int,
                window_ms: int) -> tuple[str, KeyState | None]:
    """The outcome of one event and the key's new state (None when unchanged:
    the record was already applied, or it is late, for a window already closed)."""
    if already_applied(state, partition, offset):
        return REDELIVERED, None
    start = window_start(ts_ms, window_ms)
    if state is None or start > state["w"]:
        return COUNTED, {"w": start, "c": 1, "p": partition, "o": offset}
    if start < state["w"]:
        return LATE, None
    return COUNTED, {"w": start, "c": state["c"] + 1, "p": partition, "o": offset}
