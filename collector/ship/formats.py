"""Access-log lines in, the values an event is made of out: one parser per format.

A parser turns one line (bytes, without its newline) into a ``Raw``: the values of
SHIP_FIELD_NAMES in that order, each as the log wrote it (text or a JSON number), None
where the line has none (nginx and Envoy write ``-`` for an unset value). It raises
LineError, whose reason is dead-lettered with the line, for anything it cannot read;
never another exception, whatever the bytes (tests/test_ship_formats.py tries hostile
ones). Turning the values into an event, and refusing bad ones, is events.py's work.

- ``nginx_json``: ``log_format NAME escape=json '{...}'``, one JSON object a line, keys
  as QUOTAFLOW_SHIP_FIELDS names them (default: the names of SHIP_FIELD_NAMES), latency
  in seconds ($request_time).
- ``envoy_json``: Envoy's ``json_format`` (every value a string) or ``typed_json_format``,
  keys by default as in Envoy's documented example (start_time, method, path,
  response_code, ...), latency in milliseconds (%DURATION%).
- ``nginx_combined``: nginx's predefined ``combined`` format, and after it any
  ``name=value`` (or ``name="value"``) pairs, which carry what combined does not (the
  org, the key id, the reservation's event id, $request_time as ``latency``).
- ``envoy_text``: Envoy's default format string, then such pairs as well.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable, Mapping

import msgspec

from quotaflow.core.settings import SHIP_FIELD_NAMES

Raw = tuple  # the values of SHIP_FIELD_NAMES, in that order

I = {name: i for i, name in enumerate(SHIP_FIELD_NAMES)}  # a field's place in a Raw
TEXT_FORMATS = ("nginx_combined", "envoy_text")
# For the text formats: the values their fixed part holds (the rest come from pairs).
POSITIONAL = frozenset({"time", "method", "path", "status", "response_bytes", "client_ip", "user_agent"})
ENVOY_POSITIONAL = POSITIONAL | {"request_bytes", "latency"}


class LineError(ValueError):
    """A line that is not what its format says; ``reason`` names what is wrong (never
    more than a short, bounded piece of the line)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


# Default keys of the JSON formats; QUOTAFLOW_SHIP_FIELDS overrides any of them.
NGINX_JSON_KEYS = {name: name for name in SHIP_FIELD_NAMES}
ENVOY_JSON_KEYS = {**NGINX_JSON_KEYS, "time": "start_time", "status": "response_code",
                   "request_bytes": "bytes_received", "response_bytes": "bytes_sent", "latency": "duration",
                   "client_ip": "downstream_remote_address"}
# How many milliseconds a unit of the logged latency is.
LATENCY_MS = {"nginx_json": 1000.0, "nginx_combined": 1000.0, "envoy_json": 1.0, "envoy_text": 1.0}
SERVER = {"nginx_json": "nginx", "nginx_combined": "nginx", "envoy_json": "envoy", "envoy_text": "envoy"}


def keys_for(fmt: str, fields: Mapping[str, str]) -> dict[str, str]:
    """Where each value is logged: the format's defaults, overridden by ``fields``
    (QUOTAFLOW_SHIP_FIELDS). In the text formats only the pairs can be renamed."""
    if fmt in TEXT_FORMATS:
        fixed = sorted(set(fields) & (ENVOY_POSITIONAL if fmt == "envoy_text" else POSITIONAL))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: fixed by the {fmt} format; only the name=value pairs after it "
                             "can be named")
    base = ENVOY_JSON_KEYS if fmt == "envoy_json" else NGINX_JSON_KEYS
    return {**base, **fields}


def parser(fmt: str, fields: Mapping[str, str]) -> Callable[[bytes], Raw]:
    keys = keys_for(fmt, fields)
    if fmt in ("nginx_json", "envoy_json"):
        return _json_parser(tuple(keys[name] for name in SHIP_FIELD_NAMES))
    if fmt == "nginx_combined":
        return _text_parser(_COMBINED, _combined_values, keys, POSITIONAL)
    if fmt == "envoy_text":
        return _text_parser(_ENVOY, _envoy_values, keys, ENVOY_POSITIONAL)
    raise ValueError(f"unknown format {fmt!r}")


# --- JSON ------------------------------------------------------------------------------------

def _json_parser(keys: tuple[str, ...]) -> Callable[[bytes], Raw]:
    """msgspec reads only the keys wanted, straight into a struct (no dict per line)."""
    if len(set(keys)) < len(keys):
        raise ValueError("two values named to be read from one logged field")
    line_type = msgspec.defstruct("LoggedLine", [(name, Any, None) for name in SHIP_FIELD_NAMES],
                                  rename=dict(zip(SHIP_FIELD_NAMES, keys)), gc=False)
    decode, values = msgspec.json.Decoder(line_type).decode, msgspec.structs.astuple
    DecodeError, ValidationError = msgspec.DecodeError, msgspec.ValidationError

    def parse(line: bytes) -> Raw:
        try:
            return values(decode(line))
        except ValidationError as exc:  # a DecodeError too: first
            raise LineError(f"not a JSON object ({str(exc)[:120]})") from None
        except DecodeError as exc:
            raise LineError(f"not JSON ({str(exc)[:120]}); is the log_format escape=json?") from None

    return parse


# --- text ------------------------------------------------------------------------------------

# name=value or name="value" pairs at the end of a line, none holding a quote unquoted: a
# value earlier in the line (a user agent with quotes, in Envoy's format) cannot pose as one.
_PAIRS = rb'((?: [A-Za-z0-9_.:@-]{1,64}=(?:"[^"]*"|[^" ]*))*) *'
_PAIR = re.compile(rb'([A-Za-z0-9_.:@-]{1,64})=(?:"([^"]*)"|([^" ]*))')
# $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
# (nginx writes a quote inside a value as \x22, so a quoted value holds none)
_COMBINED = re.compile(rb'(\S+) \S+ \S+ \[([^\]]*)\] "([^"]*)" (\S+) (\S+) "[^"]*" "([^"]*)"' + _PAIRS)
# [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
# %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
# "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
# Envoy does not escape quotes: the user agent takes what lies between the forwarded-for
# and the last three quoted values.
_ENVOY = re.compile(rb'\[([^\]]*)\] "(\S*) (\S*) [^"]*" (\S+) \S+ (\S+) (\S+) (\S+) \S+ "([^"]*)" "(.*)" '
                    rb'"[^"]*" "[^"]*" "[^"]*"' + _PAIRS)
_HEX_ESCAPE = re.compile(rb"\\x([0-9A-Fa-f]{2})")


def _unescape(value: bytes) -> str:
    """A value as nginx's default escaping wrote it (\\xHH for a quote, a backslash and
    bytes outside printable ASCII), as text."""
    if b"\\x" in value:
        value = _HEX_ESCAPE.sub(lambda m: bytes((int(m[1], 16),)), value)
    return value.decode("utf-8", errors="replace")


def _combined_values(m: re.Match) -> dict[str, Any]:
    addr, time_local, request, status, sent, agent = m.group(1, 2, 3, 4, 5, 6)
    method, path = _request_line(request)
    return {"client_ip": addr.decode("latin-1"), "time": time_local.decode("latin-1"), "method": method,
            "path": path, "status": status.decode("latin-1"), "response_bytes": sent.decode("latin-1"),
            "user_agent": _unescape(agent)}


def _envoy_values(m: re.Match) -> dict[str, Any]:
    start, method, path, status, received, sent, duration, forwarded, agent = m.group(1, 2, 3, 4, 5, 6, 7, 8, 9)
    return {"time": start.decode("latin-1"), "method": method.decode("latin-1"),
            "path": path.decode("utf-8", errors="replace"), "status": status.decode("latin-1"),
            "request_bytes": received.decode("latin-1"), "response_bytes": sent.decode("latin-1"),
            "latency": duration.decode("latin-1"), "client_ip": forwarded.decode("latin-1"),
            "user_agent": agent.decode("utf-8", errors="replace")}


def _request_line(request: bytes) -> tuple[str | None, str | None]:
    """(method, target) of "GET /path?q HTTP/1.1"; (None, None) when it is not one (a
    TLS handshake sent to a plain port, logged hex-escaped)."""
    parts = request.split(b" ")
    if len(parts) not in (2, 3) or not parts[0].isalpha():
        return None, None
    return parts[0].decode("latin-1"), _unescape(parts[1])


def _text_parser(pattern: re.Pattern, values: Callable[[re.Match], dict[str, Any]], keys: Mapping[str, str],
                 positional: frozenset[str]) -> Callable[[bytes], Raw]:
    by_pair = {keys[name]: name for name in SHIP_FIELD_NAMES if name not in positional}
    fullmatch = pattern.fullmatch

    def parse(line: bytes) -> Raw:
        m = fullmatch(line.rstrip(b"\r"))
        if m is None:
            raise LineError("does not match the format")
        got = values(m)
        pairs = m.group(m.re.groups)
        if pairs:
            for pm in _PAIR.finditer(pairs):
                name = by_pair.get(pm[1].decode("latin-1"))
                if name is not None:
                    got[name] = _unescape(pm[2] if pm[2] is not None else pm[3])
        return tuple(got.get(name) for name in SHIP_FIELD_NAMES)

    return parse


# --- time ------------------------------------------------------------------------------------

_TIME_CACHE: dict[str, int] = {}
_TIME_CACHE_MAX = 4096  # second-precision stamps repeat for a whole second: parse each once


def time_ms(value: Any) -> int:
    """Milliseconds since the epoch of a logged time: seconds since the epoch ($msec,
    1732945000.123, or a JSON number), ISO 8601 ($time_iso8601, Envoy's %START_TIME%)
    or nginx's $time_local (30/Nov/2026:03:42:16 +0000). LineError otherwise."""
    if type(value) is str:
        if len(value) <= 20:
            try:
                seconds = float(value)  # $msec: unique to every line, so not worth caching
            except ValueError:
                pass
            else:
                return _epoch_ms(seconds)
        cached = _TIME_CACHE.get(value)
        if cached is not None:
            return cached
        ms = _parse_time(value)
        if len(_TIME_CACHE) >= _TIME_CACHE_MAX:
            _TIME_CACHE.clear()
        if len(value) <= 40:
            _TIME_CACHE[value] = ms
        return ms
    if type(value) in (int, float):
        return _epoch_ms(value)
    raise LineError("time: missing" if value is None else f"time: must be text or a number, got {type(value).__name__}")


_EPOCH = re.compile(r"[0-9]{9,11}(?:\.[0-9]{1,9})?")


def _parse_time(text: str) -> int:
    if _EPOCH.fullmatch(text):
        seconds, _, fraction = text.partition(".")
        return int(seconds) * 1000 + int((fraction + "000")[:3])
    try:
        if "/" in text:
            stamp = datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z")
        else:
            stamp = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise LineError("time: neither seconds since the epoch, ISO 8601 nor nginx's $time_local") from None
    if stamp.tzinfo is None:
        raise LineError("time: ISO 8601 without a time zone")
    return int(stamp.timestamp() * 1000)


def _epoch_ms(value: int | float) -> int:
    if not 1e8 <= value < 1e11:  # also NaN and infinities
        raise LineError("time: seconds since the epoch out of range")
    return int(value * 1000 + 0.5)
