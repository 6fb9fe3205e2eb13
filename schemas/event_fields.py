"""The fields of a RequestEvent and the rule each value follows, declared once: ``FIELDS``.

Every check of an event is derived from a field's rule, so a bound or a pattern changed
here changes all of them:

- ``error``: the checker; it words why a value is refused (field, rule, offending value).
  validate's slow path, hence every message a publisher reads, comes from it.
- ``wire_type``: what msgspec checks while it parses a batch record or converts a dict,
  in C (the fast paths): JSON type, length, choices, range.
- ``complete_on_wire``: whether that is the whole rule. When it is not (patterns,
  addresses), the fast paths ask ``error`` once per distinct value (``repeats``, cached)
  or, for values unique to an event, test ``matches`` / ``all_match`` (uncached).
- ``json_schema``: the field's keywords in request_event.v1.schema.json.
- ``value``: the event's value for a valid input (JSON Schema's 12.0 is the integer 12).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol

import msgspec

from quotaflow.schemas.ids import ID_MAX, ID_PATTERN, ID_RULE, show

SCHEMA_VERSION = 1

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "OTHER")  # OTHER: any method not listed

# 2000-01-01 .. 2100-01-01 in ms: catches seconds or microseconds sent by mistake.
TS_MIN_MS = 946_684_800_000
TS_MAX_MS = 4_102_444_800_000

UUID_GROUPS = (8, 4, 4, 4, 12)  # hex digits per group of a UUID's text
UUID_PATTERN = "^" + "-".join(f"[0-9a-f]{{{n}}}" for n in UUID_GROUPS) + "$"
# A route template: absolute, no query or fragment, no segment that is a raw id
# (all digits, a UUID, or a long hex string). Raw paths would make per-endpoint
# rollups explode in cardinality, so they are rejected at the door.
RAW_ID_SEGMENT = ("(?:[0-9]+|" + "-".join(f"[0-9a-fA-F]{{{n}}}" for n in UUID_GROUPS)  # in either case
                  + "|[0-9a-fA-F]{16,})")
ENDPOINT_PATTERN = rf"^(?!.*/{RAW_ID_SEGMENT}(?:/|$))/[A-Za-z0-9._~!$&'()*+,;=:@%{{}}/-]*$"
ENDPOINT_MAX = 256
USER_AGENT_MAX = 512
CLIENT_IP_MAX = 64  # the longest IPv6 text (45) with room for a zone id
LATENCY_MAX_MS = 86_400_000.0
BYTES_MAX = 2**53 - 1  # largest integer every JSON parser reads exactly


class Rule(Protocol):
    """What every kind of rule below provides (see the module's docstring)."""

    json_type: str  # "string" | "integer" | "number"
    complete_on_wire: bool
    repeats: bool  # values recur from event to event: verdicts worth caching

    def error(self, name: str, value: Any) -> str | None: ...
    def wire_type(self) -> Any: ...
    def json_schema(self) -> dict[str, Any]: ...
    def value(self, value: Any) -> Any: ...


class _Kind:
    __slots__ = ()
    complete_on_wire: ClassVar[bool] = True  # the default; kinds with patterns say otherwise
    repeats: ClassVar[bool] = True


# Numbers --------------------------------------------------------------------------------

def _number_error(name: str, value: Any, integer: bool) -> str | None:
    """Whether ``value`` is a finite JSON number (a whole one when ``integer``), in words."""
    # bool is an int subclass in Python but not a number on the wire
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}: must be {'an integer' if integer else 'a number'}, got {type(value).__name__} {show(value)}"
    if integer and not isinstance(value, int) and not float(value).is_integer():
        return f"{name}: must be an integer, got {show(value)}"  # 12.0 is an integer, as in JSON Schema
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}: must be a finite number, got {show(value)}"
    return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True, slots=True)
class Const(_Kind):
    """One integer and no other (a schema version)."""

    const: int
    json_type: ClassVar[str] = "integer"

    def error(self, name: str, value: Any) -> str | None:
        problem = _number_error(name, value, integer=True)
        if problem is None and value != self.const:
            return f"{name}: must be {self.const}, got {show(value)}"
        return problem

    def wire_type(self) -> Any:  # strict: 1.0 and true are not 1 here (validate's slow path takes 1.0)
        return Literal[self.const]

    def json_schema(self) -> dict[str, Any]:
        return {"const": self.const}

    def value(self, value: Any) -> int:
        return int(value)


@dataclass(frozen=True, slots=True)
class Number(_Kind):
    """A finite number within [minimum, maximum]; ``integer``: a whole one. ``unit`` is
    named in the error, for values whose unit is easy to get wrong."""

    minimum: float
    maximum: float
    integer: bool = False
    unit: str = ""

    @property
    def json_type(self) -> str:
        return "integer" if self.integer else "number"

    def error(self, name: str, value: Any) -> str | None:
        problem = _number_error(name, value, self.integer)
        if problem is None and not self.minimum <= value <= self.maximum:
            unit = f" ({self.unit})" if self.unit else ""
            return f"{name}: must be between {_num(self.minimum)} and {_num(self.maximum)}{unit}, got {show(value)}"
        return problem

    def wire_type(self) -> Any:
        if self.integer:  # strict: 12.0 and true are not ints here (validate's slow path takes 12.0)
            return Annotated[int, msgspec.Meta(ge=int(self.minimum), le=int(self.maximum))]
        return Annotated[float, msgspec.Meta(ge=self.minimum, le=self.maximum)]  # an int is taken, as a float

    def json_schema(self) -> dict[str, Any]:
        return {"minimum": self.minimum, "maximum": self.maximum}

    def value(self, value: Any) -> int | float:
        return int(value) if self.integer else float(value)


def Integer(minimum: int, maximum: int, unit: str = "") -> Number:
    """A whole number within [minimum, maximum]."""
    return Number(minimum, maximum, integer=True, unit=unit)


# Strings --------------------------------------------------------------------------------

def _string_error(name: str, value: Any, max_length: int | None) -> str | None:
    if not isinstance(value, str):
        return f"{name}: must be a string, got {type(value).__name__} {show(value)}"
    if max_length is not None and len(value) > max_length:
        return f"{name}: at most {max_length} characters, got {len(value)}"
    return None


class _String(_Kind):
    __slots__ = ()
    json_type: ClassVar[str] = "string"

    def wire_type(self) -> Any:  # for the kinds with a max_length
        return Annotated[str, msgspec.Meta(max_length=self.max_length)]  # type: ignore[attr-defined]

    def value(self, value: Any) -> str:
        return value  # as given (a str subclass stays one)


@dataclass(frozen=True, slots=True)
class Text(_String):
    """Any text of at most ``max_length`` characters."""

    max_length: int

    def error(self, name: str, value: Any) -> str | None:
        return _string_error(name, value, self.max_length)

    def json_schema(self) -> dict[str, Any]:
        return {"maxLength": self.max_length}


@dataclass(frozen=True, slots=True)
class OneOf(_String):
    """One of a few words."""

    choices: tuple[str, ...]

    def error(self, name: str, value: Any) -> str | None:
        problem = _string_error(name, value, None)
        if problem is None and value not in self.choices:
            return f"{name}: must be one of {', '.join(self.choices)}, got {show(value)}"
        return problem

    def wire_type(self) -> Any:
        return Literal[self.choices]

    def json_schema(self) -> dict[str, Any]:
        return {"enum": list(self.choices)}


@dataclass(frozen=True, slots=True)
class Id(_String):
    """An id naming a tenant or a part of one: the rule of schemas/ids.py."""

    complete_on_wire: ClassVar[bool] = False

    def error(self, name: str, value: Any) -> str | None:
        problem = _string_error(name, value, None)
        if problem is None and not _ID.fullmatch(value):
            return f"{name}: must be {ID_RULE}, got {show(value)}"
        return problem

    def wire_type(self) -> Any:
        return Annotated[str, msgspec.Meta(max_length=ID_MAX)]

    def json_schema(self) -> dict[str, Any]:
        return {"pattern": ID_PATTERN}  # the pattern bounds the length too


_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class RouteTemplate(_String):
    """A route template (ENDPOINT_PATTERN) of at most ``max_length`` characters; a refusal
    says which part of the pattern the value breaks."""

    max_length: int
    complete_on_wire: ClassVar[bool] = False

    def error(self, name: str, value: Any) -> str | None:
        problem = _string_error(name, value, self.max_length)
        if problem is not None or _ENDPOINT.fullmatch(value):
            return problem
        if not value.startswith("/"):
            return f"{name}: must start with '/', got {show(value)}"
        if "?" in value or "#" in value:
            return f"{name}: must not carry a query string or fragment, got {show(value)}"
        for segment in value.split("/"):
            if _RAW_ID.fullmatch(segment):
                return (f"{name}: segment {segment!r} looks like a raw id; publish the route template "
                        f"(for example /users/{{id}}), got {show(value)}")
        return f"{name}: may only contain URL path characters, got {show(value)}"

    def json_schema(self) -> dict[str, Any]:
        return {"maxLength": self.max_length, "pattern": ENDPOINT_PATTERN}


_ENDPOINT = re.compile(ENDPOINT_PATTERN)
_RAW_ID = re.compile(RAW_ID_SEGMENT)


@dataclass(frozen=True, slots=True)
class IpAddress(_String):
    """An IPv4 or IPv6 address as text, of at most ``max_length`` characters."""

    max_length: int
    complete_on_wire: ClassVar[bool] = False

    def error(self, name: str, value: Any) -> str | None:
        problem = _string_error(name, value, self.max_length)
        if problem is None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                return f"{name}: must be an IPv4 or IPv6 address, got {show(value)}"
        return problem

    def json_schema(self) -> dict[str, Any]:
        return {"maxLength": self.max_length, "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}


@dataclass(frozen=True, slots=True)
class LowercaseUuid(_String):
    """A UUID in its canonical lowercase text (UUID_PATTERN). Every event has its own, so
    verdicts are not cached: a batch's ids are checked all at once (``all_match``)."""

    complete_on_wire: ClassVar[bool] = False
    repeats: ClassVar[bool] = False

    def error(self, name: str, value: Any) -> str | None:
        problem = _string_error(name, value, None)
        if problem is None and not self.matches(value):
            return f"{name}: must be a lowercase UUID like 123e4567-e89b-42d3-a456-426614174000, got {show(value)}"
        return problem

    @staticmethod
    def matches(value: str) -> bool:
        return _UUID.fullmatch(value) is not None

    @staticmethod
    def all_match(column: tuple[str, ...]) -> bool:
        """All lowercase UUIDs: the column joined by newlines, its hex digits mapped to 'x',
        is the shape of a UUID line repeated, compared in C. The count of newlines rules
        out an id hiding a newline of its own."""
        try:
            text = ("\n".join(column) + "\n").encode("ascii")
        except UnicodeEncodeError:
            return False
        return text.translate(_UUID_CHARS) == _UUID_LINE * len(column)

    def wire_type(self) -> Any:
        return str

    def json_schema(self) -> dict[str, Any]:
        return {"pattern": UUID_PATTERN}


_UUID = re.compile(UUID_PATTERN)
_UUID_LINE = ("-".join("x" * n for n in UUID_GROUPS) + "\n").encode()  # UUID_PATTERN's shape, and a newline
_UUID_CHARS = bytes(ord("x") if chr(b) in "0123456789abcdef" else b if chr(b) in "-\n" else ord("?")
                    for b in range(256))  # a translate table: hex digit -> x, - and newline kept, else ?


# The declaration ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Field:
    name: str
    description: str  # for publishers: the exported JSON Schema carries it
    rule: Rule

    def error(self, value: Any) -> str | None:
        """The error message for this field's value, or None when it is valid."""
        return self.rule.error(self.name, value)

    def json_schema(self) -> dict[str, Any]:
        return {"type": self.rule.json_type, "description": self.description, **self.rule.json_schema()}


# In wire order, which is RequestEvent's order.
FIELDS: tuple[Field, ...] = (
    Field("schema_version", "Version of this schema.", Const(SCHEMA_VERSION)),
    Field("event_id", "Unique id generated by the publisher (lowercase UUID); makes redelivery detectable.",
          LowercaseUuid()),
    Field("ts_ms", "Event time: when the request was received, in milliseconds since the Unix epoch (UTC).",
          Integer(TS_MIN_MS, TS_MAX_MS, unit="milliseconds since the epoch")),
    Field("org_id", "Organization (tenant) that owns the API key.", Id()),
    Field("api_key_id", "Public id of the API key used (never the secret).", Id()),
    Field("service", "Name of the service that served the request.", Id()),
    Field("endpoint", "Route template, not the raw path: /v1/users/{id}, never /v1/users/42 or a query string.",
          RouteTemplate(max_length=ENDPOINT_MAX)),
    Field("method", "HTTP method, upper case.", OneOf(METHODS)),
    Field("status", "HTTP status code of the response.", Integer(100, 599)),
    Field("latency_ms", "Time to serve the request, in milliseconds.", Number(0, LATENCY_MAX_MS)),
    Field("request_bytes", "Size of the request body in bytes.", Integer(0, BYTES_MAX)),
    Field("response_bytes", "Size of the response body in bytes.", Integer(0, BYTES_MAX)),
    Field("client_ip", "Client IP address (IPv4 or IPv6).", IpAddress(max_length=CLIENT_IP_MAX)),
    Field("user_agent", "User-Agent header, possibly empty; collectors truncate it to the maximum.",
          Text(max_length=USER_AGENT_MAX)),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
