"""RequestEvent, and ``validate``: a document in, a valid event or every reason why not out.

Every rule comes from the fields' declaration (schemas/event_fields.py). Every consumer
validates every event, so valid events take a fast path: msgspec checks the document
against ``WireEvent`` (each field's ``wire_type``) in C, and what the wire types leave
out is tested once per distinct value (cached) or, for a value unique to its event,
directly. Anything the fast path doubts goes to the slow path, which asks each field's
``error`` and so finds the words for every problem.
"""

from __future__ import annotations

import functools
import operator
import time
import uuid
from decimal import Decimal
from itertools import repeat
from typing import Any, Mapping, NamedTuple

import msgspec
import orjson

from quotaflow.schemas.event_fields import FIELD_NAMES, FIELDS, SCHEMA_VERSION
from quotaflow.schemas.event_partitions import partition_key

MAX_ERRORS = 8


class SchemaError(ValueError):
    """The input is not a valid RequestEvent; ``errors`` says why, one line per field."""

    def __init__(self, errors: list[str], kind: str = "invalid"):
        self.errors = errors
        self.kind = kind  # "invalid"; for a valid event at the wrong time, TimeBounds' kinds
        self.index: int | None = None  # the refused item's index, when it came in a batch record
        self.payload: bytes | None = None  # that item alone (None: dead-letter the record as published)
        super().__init__("; ".join(errors))


class RequestEvent(NamedTuple):
    """One valid event. A named tuple: immutable, and cheap to build for every record.
    Its fields are FIELDS, in that order (checked below)."""

    schema_version: int
    event_id: str
    ts_ms: int
    org_id: str
    api_key_id: str
    service: str
    endpoint: str
    method: str
    status: int
    latency_ms: float
    request_bytes: int
    response_bytes: int
    client_ip: str
    user_agent: str

    @classmethod
    def new(cls, **fields: Any) -> "RequestEvent":
        """Build and validate an event, filling in schema_version, event_id and ts_ms when absent."""
        fields.setdefault("schema_version", SCHEMA_VERSION)
        fields.setdefault("event_id", str(uuid.uuid4()))
        fields.setdefault("ts_ms", int(time.time() * 1000))
        return validate(fields)

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @property
    def partition_key(self) -> bytes:
        return partition_key(self.org_id)


if RequestEvent._fields != FIELD_NAMES:
    raise TypeError("RequestEvent's fields must be FIELDS, in the same order")

make_event = functools.partial(tuple.__new__, RequestEvent)  # RequestEvent(*values) without its Python-level __new__

# What msgspec checks while it parses or converts: every field present, no other, each
# of its wire type. Not tracked by the garbage collector: it holds no containers.
WireEvent = msgspec.defstruct("WireEvent", [(f.name, f.rule.wire_type()) for f in FIELDS],
                              forbid_unknown_fields=True, gc=False)
wire_values = msgspec.structs.astuple  # a WireEvent's values, in FIELDS order

# What the wire types leave out, by kind: verdicts on values that recur (orgs, keys,
# services, endpoints, client addresses) are cached; values unique to an event are not.
_REPEATING = tuple(i for i, f in enumerate(FIELDS) if not f.rule.complete_on_wire and f.rule.repeats)
_UNIQUE = tuple((i, f.rule) for i, f in enumerate(FIELDS) if not f.rule.complete_on_wire and not f.rule.repeats)
_repeating_values = operator.itemgetter(*_REPEATING) if len(_REPEATING) > 1 else lambda v: (v[_REPEATING[0]],)

# Only values that passed their wire type reach a cache, so each is within its field's
# length: what a cache holds is bounded in bytes as well as in entries, whatever a
# publisher sends.
_CACHE_ENTRIES = 16384


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _valid_string(index: int, value: str) -> bool:
    return FIELDS[index].error(value) is None


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _valid_strings(values: tuple[str, ...]) -> bool:
    return all(map(_valid_string, _REPEATING, values))


def valid_row(values: tuple) -> bool:
    """Whether one event's values (FIELDS order) all pass what their wire types left out:
    the recurring ones in one cached lookup, the unique ones each."""
    if not _valid_strings(_repeating_values(values)):
        return False
    for i, rule in _UNIQUE:
        if not rule.matches(values[i]):
            return False
    return True


def valid_columns(columns: tuple[tuple, ...]) -> bool:
    """Whether the values of a batch, one tuple per field, all pass what their wire types
    left out: the recurring ones once per distinct value, the unique ones all at once."""
    return (all(all(map(_valid_string, repeat(i), set(columns[i]))) for i in _REPEATING)
            and all(rule.all_match(columns[i]) for i, rule in _UNIQUE))


# msgspec.convert also reads a Decimal as a float, which the rules do not take (not a JSON
# value): such a document goes to the slow path, which refuses it by name.
_FLOATS = tuple(f.name for f in FIELDS if f.rule.json_type == "number")
_convert, _MsgspecError = msgspec.convert, msgspec.MsgspecError


def validate(doc: Mapping[str, Any]) -> RequestEvent:
    """Return the event described by ``doc`` or raise SchemaError listing every problem."""
    if type(doc) is dict and (event := validate_fast(doc)) is not None:
        return event
    return _validate_slowly(doc)


def validate_fast(doc: dict) -> RequestEvent | None:
    """The event, when ``doc`` passes the fast path's tests; None when they doubt it (the
    slow path then judges it, and words why)."""
    try:
        values = wire_values(_convert(doc, WireEvent))
    except _MsgspecError:  # the slow path runs outside this handler: a SchemaError raised in
        return None  # it would keep this error, its frame and the document as its __context__
    if not valid_row(values):
        return None
    for name in _FLOATS:
        if type(doc[name]) is Decimal:
            return None
    return make_event(values)


_NAMES = frozenset(FIELD_NAMES)


def _validate_slowly(doc: Mapping[str, Any]) -> RequestEvent:
    if not isinstance(doc, Mapping):
        raise SchemaError([f"event: must be a JSON object, got {type(doc).__name__}"])
    errors: list[str] = []
    version = doc.get("schema_version")
    if "schema_version" in doc and version != SCHEMA_VERSION and isinstance(version, int) and not isinstance(version, bool):
        raise SchemaError([f"schema_version: {version} is not supported by this consumer (supported: {SCHEMA_VERSION})"])
    for field in FIELDS:
        if field.name not in doc:
            errors.append(f"{field.name}: required field is missing")
            continue
        problem = field.error(doc[field.name])
        if problem:
            errors.append(problem)
    unknown = sorted(set(doc) - _NAMES)
    if unknown:
        errors.append(f"unknown field(s): {', '.join(map(str, unknown))}")
    if errors:
        raise SchemaError(errors[:MAX_ERRORS])
    return make_event(tuple(f.rule.value(doc[f.name]) for f in FIELDS))
