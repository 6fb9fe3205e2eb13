"""Records of the events topic, read: one event, or a batch of one org's events.

A record's value is one JSON object, or a JSON array of up to MAX_EVENTS_PER_RECORD
objects of one org (the record's key). Every item is judged alone: an event, or the
SchemaError that refuses it, with what to dead-letter. A record whose items are all valid
(the usual case) takes a fast path: parsed by msgspec straight into WireEvents and checked
column by column, never as a dict per event.
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple, Sequence

import msgspec
import orjson

from quotaflow.schemas.event_fields import FIELD_NAMES
from quotaflow.schemas.event_time import TimeBounds
from quotaflow.schemas.event_validation import (
    RequestEvent,
    SchemaError,
    WireEvent,
    make_event,
    valid_columns,
    valid_row,
    validate,
    wire_values,
)
from quotaflow.schemas.ids import show

MAX_EVENTS_PER_RECORD = 10_000  # also bounds the index of an event within its record
MAX_DEPTH = 8  # an event is a flat JSON object; a batch nests it once

_BATCH = msgspec.json.Decoder(Annotated[list[WireEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_RECORD)])
_ONE = msgspec.json.Decoder(WireEvent)
_ORG_ID = FIELD_NAMES.index("org_id")
_TS_MS = FIELD_NAMES.index("ts_ms")


def encode_batch(events: list[RequestEvent]) -> bytes:
    """One record for several events of one org."""
    return orjson.dumps([ev._asdict() for ev in events])


def decode(data: bytes | None) -> RequestEvent:
    """Parse a single-event record value into a RequestEvent or raise SchemaError."""
    return validate(_load(data))


def decode_record(data: bytes | None, received_ms: int = 0,
                  bounds: TimeBounds | None = None) -> list[RequestEvent | SchemaError]:
    """The events a record of the events topic carries: one JSON object, or a JSON array
    of up to MAX_EVENTS_PER_RECORD objects of one org (the record's key). Each item is
    the event, or the SchemaError that refuses it, with ``index`` and ``payload`` set
    (that item alone) so it can be dead-lettered by itself. A record refused as a whole
    is a single SchemaError without index or payload. With ``bounds``, events whose time
    is too far from ``received_ms`` (the record's timestamp) are refused."""
    checked = _fast(data, received_ms, bounds)
    if checked is not None:
        return list(map(make_event, checked[0]))
    return _slow(data, received_ms, bounds)


class RecordColumns(NamedTuple):
    """A record's events as columns, for a consumer that stores or counts columns and
    never needs the events one by one."""

    columns: tuple[tuple, ...]  # the valid events, one tuple per field of FIELDS; () when none
    indexes: Sequence[int]  # per valid event, its index in the record
    refused: list[tuple[int | None, SchemaError]]  # per refused item, its index (None: the whole record) and why


def decode_columns(data: bytes | None, received_ms: int = 0, bounds: TimeBounds | None = None) -> RecordColumns:
    """decode_record's answer as columns: a record whose events are all valid (the usual
    case) is never turned into events one by one."""
    checked = _fast(data, received_ms, bounds)
    if checked is not None:  # never turned into events: the columns are all the caller wants
        return RecordColumns(checked[1], range(len(checked[0])), [])
    items = _slow(data, received_ms, bounds)
    valid = [(i, ev) for i, ev in enumerate(items) if not isinstance(ev, SchemaError)]
    refused = [(ev.index, ev) for ev in items if isinstance(ev, SchemaError)]
    return RecordColumns(tuple(zip(*(ev for _, ev in valid), strict=True)), [i for i, _ in valid], refused)


def _fast(data: bytes | None, received_ms: int, bounds: TimeBounds | None
          ) -> tuple[list[tuple], tuple[tuple, ...]] | None:
    """(rows, columns) when the fast path takes the record (decode_batch_fast, every event in
    time); None: it goes item by item (_slow)."""
    checked = decode_batch_fast(data) if data is not None else None
    if checked is not None:
        cols = checked[1]
        if bounds is None or (bounds.error(min(cols[_TS_MS]), received_ms) is None
                              and bounds.error(max(cols[_TS_MS]), received_ms) is None):
            return checked
    return None


def _slow(data: bytes | None, received_ms: int, bounds: TimeBounds | None) -> list[RequestEvent | SchemaError]:
    """The record item by item: each event, or why it is refused."""
    try:
        doc = _load(data)
    except SchemaError as exc:
        return [exc.with_traceback(None)]
    return _items(doc, bounds, received_ms)


def decode_batch_fast(data: bytes) -> tuple[list[tuple], tuple[tuple, ...]] | None:
    """(rows, columns) of a record, when every item is a valid event of one org (a single
    event: one row): each row a RequestEvent's values, each column one field's values
    (FIELDS order). None otherwise: the caller then reads and validates item by item, which
    finds and words the errors.

    The same rules as validate, only stricter on types (an int written 12.0 goes item by
    item): msgspec checks the wire types (presence, unknown fields, lengths, choices,
    ranges) while it parses, in C, without building a dict per event; the rest is then
    checked once per distinct value of a column. Item-by-item validation of parsed dicts
    was most of the cost of reading a record."""
    try:
        # One event a record (kcat, Kafka Connect, most non-Python producers) as often as many.
        events = [_ONE.decode(data)] if data[:1] == b"{" else _BATCH.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    rows = list(map(wire_values, events))
    if len(rows) == 1:  # one event: its checks without building a set per column
        return (rows, tuple((value,) for value in rows[0])) if valid_row(rows[0]) else None
    cols = tuple(zip(*rows, strict=True))
    if len(set(cols[_ORG_ID])) != 1 or not valid_columns(cols):
        return None
    return rows, cols


def decode_one(data: bytes | None) -> tuple | None:
    """The values (FIELDS order) of a record holding one valid event, as decode_batch_fast
    takes it; None for any other record, which the caller reads the general way
    (decode_columns), finding and wording what is wrong. A consumer of one-event records
    (kcat, Kafka Connect) calls this per record: no columns to build for one row.
    The event's time is not judged here: that needs the record's time (TimeBounds)."""
    if data is None or data[:1] != b"{":
        return None
    try:
        row = wire_values(_ONE.decode(data))
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    return row if valid_row(row) else None


def _load(data: bytes | None) -> Any:
    """The JSON document of a record value, or SchemaError when there is none to read."""
    if data is None:
        raise SchemaError(["event: record has no value (tombstone)"])
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError([f"event: not valid UTF-8 JSON ({exc})"]) from None


def _items(doc: Any, bounds: TimeBounds | None, received_ms: int) -> list[RequestEvent | SchemaError]:
    """decode_record's answer for a parsed record, item by item."""
    if type(doc) is not list:
        try:
            return [_in_time(validate(doc), bounds, received_ms)]
        except SchemaError as exc:
            return [exc.with_traceback(None)]
    if not 1 <= len(doc) <= MAX_EVENTS_PER_RECORD:
        return [SchemaError([f"record: a batch holds 1 to {MAX_EVENTS_PER_RECORD} events, got {len(doc)}"])]
    out: list[RequestEvent | SchemaError] = []
    org = None
    for index, item in enumerate(doc):
        try:
            ev = _in_time(validate(item), bounds, received_ms)
            if org is None:
                org = ev.org_id
            elif ev.org_id != org:
                raise SchemaError([f"org_id: a batch carries one org's events; expected {show(org)}, "
                                   f"got {show(ev.org_id)}"])
            out.append(ev)
        except SchemaError as exc:
            # Kept without its traceback: its frames (the document among them) would
            # otherwise stay alive in a cycle until the next full collection.
            exc.index, exc.payload = index, _payload(item)
            out.append(exc.with_traceback(None))
    return out


def _in_time(ev: RequestEvent, bounds: TimeBounds | None, received_ms: int) -> RequestEvent:
    if bounds is not None and (problem := bounds.error(ev.ts_ms, received_ms)):
        raise SchemaError([problem], kind=bounds.kind(ev.ts_ms, received_ms))
    return ev


def _payload(item: Any) -> bytes | None:
    """A refused item of a batch, alone, for its dead letter. An item nested deeper than
    any event can be is not re-encoded (encoders give up at some depth): its dead letter
    carries the record as published instead, with the item's index."""
    return None if _deeper_than(item, MAX_DEPTH) else orjson.dumps(item)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests more than ``limit`` levels (iterative: a deep
    value must not exhaust the stack that measures it)."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if type(v) is dict:
            v = v.values()
        elif type(v) is not list:
            continue
        if depth > limit:
            return True
        todo.extend((x, depth + 1) for x in v if type(x) in (dict, list))
    return False
