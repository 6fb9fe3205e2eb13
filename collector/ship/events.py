"""A parsed line (formats.Raw) as a RequestEvent document, or the LineError that refuses it.

What the server logged about the request is fitted into the schema's bounds as the
gateway fits what it sees (gateway/request_event.py): a method it does not list is
OTHER, a status outside 100..599 is 500, an address that is not one is 0.0.0.0, the
user agent is cut to its maximum, the path goes through the route map. Each change is
counted by field (``normalised``). What cannot be an event is refused with the reason:
a line without a path or a time, numbers that are not numbers, and the identity: an org
or key id that breaks the id rule (schemas/ids.py) is never fitted, since two ids made
alike would be one tenant; the reason names the field and the rule, not the value.

The event_id is the one the gateway's check gave the request, when the line logs it
(nginx's $qf_event_id): then the processor releases that reservation when it counts the
event. Otherwise it is derived from the file and the line: uuid5 of the file's
fingerprint and the line's offset, so a line read twice (after a crash, or in the copy
copytruncate made) is the same event, which the processor and the sink take once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import uuid
from typing import Any

from quotaflow.collector.ship.formats import I, LineError, Raw, time_ms
from quotaflow.collector.ship.routes import RouteMap
from quotaflow.schemas.event_fields import (
    BYTES_MAX,
    LATENCY_MAX_MS,
    METHODS,
    SCHEMA_VERSION,
    TS_MAX_MS,
    TS_MIN_MS,
    USER_AGENT_MAX,
)
from quotaflow.schemas.ids import ID_RULE, is_valid_id

# uuid5's namespace for line ids: uuid5(NAMESPACE, f"{fingerprint}:{offset}").
NAMESPACE = uuid.UUID("6f0b6f36-1c55-5d0e-9d8a-6a1f3c0e5e21")
OTHER_METHOD = "OTHER"
UNKNOWN_CLIENT = "0.0.0.0"
SERVER_ERROR = 500
_ABSENT = (None, "", "-")
_METHODS = frozenset(METHODS)
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DIGITS = re.compile(r"[0-9]{1,20}")
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant bits on a hex digit
_CACHE_MAX = 16384
_STATUS = {**{str(code): code for code in range(100, 600)}, **{code: code for code in range(100, 600)}}
_ZERO = (None, "", "-", "0", 0)  # no body
T, METHOD, PATH, STATUS, REQ_BYTES, RESP_BYTES, LATENCY, CLIENT, AGENT, ORG, KEY, EVENT_ID, EVENT_TS = (
    I["time"], I["method"], I["path"], I["status"], I["request_bytes"], I["response_bytes"], I["latency"],
    I["client_ip"], I["user_agent"], I["org_id"], I["api_key_id"], I["event_id"], I["event_ts"])


class LineIds:
    """Event ids of the lines of one file: uuid5(NAMESPACE, "<fingerprint>:<offset>"),
    with the hash of the common prefix computed once."""

    def __init__(self, fingerprint: str):
        self._base = hashlib.sha1(NAMESPACE.bytes + f"{fingerprint}:".encode())

    def __call__(self, offset: int) -> str:
        h = self._base.copy()
        h.update(b"%d" % offset)
        x = h.hexdigest()
        return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


class EventBuilder:
    def __init__(self, routes: RouteMap, *, service: str, latency_ms_per_unit: float,
                 default_org_id: str | None = None, default_api_key_id: str | None = None):
        for name, value in (("service", service), ("default org_id", default_org_id),
                            ("default api_key_id", default_api_key_id)):
            if value is not None and not is_valid_id(value):
                raise ValueError(f"{name}: must be {ID_RULE}")
        self.routes = routes
        self.service = service
        self.latency_scale = latency_ms_per_unit
        self.default_org_id = default_org_id
        self.default_api_key_id = default_api_key_id
        self.normalised: dict[str, int] = {}  # field -> events changed to fit the schema (read and reset by the caller)
        self._ids: set[str] = set()  # ids found valid (they recur: checked once)
        self._ips: dict[str, str] = {}  # logged client address -> the address an event takes

    def build(self, raw: Raw, line_id: LineIds, offset: int) -> dict[str, Any]:
        """The event of a line (raw values), or LineError. Every value takes a fast path
        for what logs hold nearly always; anything else goes to the field's own method."""
        t, method, path, status, req, resp, latency, client, agent, org, key, event_id, event_ts = raw
        if type(path) is not str or path in _ABSENT:
            raise LineError("path: missing (no request line, or the log does not record the path)")
        cut = path.find("?")
        if cut >= 0:
            path = path[:cut]  # the query string is not part of a route (and may carry a token)
        endpoint, changed = self.routes.endpoint(path)
        if changed:
            self._count("endpoint")
        ids = self._ids
        if type(org) is not str or org not in ids:
            org = self._id(org, "org_id", self.default_org_id)
        if type(key) is not str or key not in ids:
            key = self._id(key, "api_key_id", self.default_api_key_id)

        ts = time_ms(t)
        if not TS_MIN_MS <= ts <= TS_MAX_MS:
            raise LineError("time: not between 2000 and 2100")
        if event_ts not in _ABSENT:
            ts = self._event_ts(event_ts)
        if event_id in _ABSENT:
            event_id = line_id(offset)
        elif type(event_id) is str and len(event_id) == 36 and _UUID.fullmatch(event_id):
            event_id = event_id.lower()
        else:
            raise LineError("event_id: must be a UUID (the X-Quotaflow-Event-Id of the gateway's check)")

        if type(method) is not str or method not in _METHODS:
            method = self._method(method)
        code = _STATUS.get(status) if type(status) in (str, int) else None
        if code is None:
            code = self._status(status)
        req = 0 if req in _ZERO else self._bytes(req, "request_bytes")
        resp = 0 if resp in _ZERO else self._bytes(resp, "response_bytes")
        ip = self._ips.get(client) if type(client) is str else None
        if ip is None or ip is UNKNOWN_CLIENT:
            ip = self._client(client)
        if type(agent) is not str or len(agent) > USER_AGENT_MAX or agent == "-":
            agent = self._agent(agent)
        return {
            "schema_version": SCHEMA_VERSION, "event_id": event_id, "ts_ms": ts, "org_id": org,
            "api_key_id": key, "service": self.service, "endpoint": endpoint, "method": method,
            "status": code, "latency_ms": self._latency(latency), "request_bytes": req, "response_bytes": resp,
            "client_ip": ip, "user_agent": agent,
        }

    # --- the fields ---

    def _id(self, value: Any, name: str, default: str | None) -> str:
        if type(value) is str and value in self._ids:
            return value
        if value in _ABSENT:
            if default is None:
                raise LineError(f"{name}: missing (the line logs none, and no default is configured)")
            return default
        if not is_valid_id(value):
            raise LineError(f"{name}: must be {ID_RULE}")  # not the value: a key or token may sit there by mistake
        if len(self._ids) >= _CACHE_MAX:
            self._ids.clear()
        self._ids.add(value)
        return value

    def _method(self, value: Any) -> str:
        method = value.upper() if type(value) is str else ""
        self._count("method")
        return method if method in _METHODS else OTHER_METHOD

    def _event_ts(self, value: Any) -> int:
        if type(value) is str and _DIGITS.fullmatch(value):
            value = int(value)
        if type(value) is not int or not TS_MIN_MS <= value <= TS_MAX_MS:
            raise LineError("event_ts: must be milliseconds since the epoch (the X-Quotaflow-Event-Ts of the "
                            "gateway's check)")
        return value

    def _status(self, value: Any) -> int:
        if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 3:
            value = int(value)
        elif type(value) is not int:
            raise LineError("status: missing" if value in _ABSENT else "status: must be an HTTP status code")
        if 100 <= value <= 599:
            return value
        self._count("status")  # Envoy's 0: no response was sent (the client went away)
        return SERVER_ERROR

    def _bytes(self, value: Any, name: str) -> int:
        if type(value) is str:
            if value in _ABSENT:
                return 0
            if not (value.isascii() and value.isdigit()):
                raise LineError(f"{name}: must be a number of bytes")
            value = int(value) if len(value) <= 16 else BYTES_MAX + 1
        elif value is None:
            return 0
        elif type(value) is not int:
            raise LineError(f"{name}: must be a number of bytes")
        if 0 <= value <= BYTES_MAX:
            return value
        if value < 0:
            raise LineError(f"{name}: must be a number of bytes")
        self._count(name)
        return BYTES_MAX

    def _latency(self, value: Any) -> float:
        if type(value) is str:
            if value in _ABSENT:
                return 0.0
            try:
                value = float(value)
            except ValueError:
                raise LineError("latency: must be a number") from None
        elif value is None:
            return 0.0
        elif type(value) not in (int, float):
            raise LineError("latency: must be a number")
        ms = value * self.latency_scale
        if not 0 <= ms <= LATENCY_MAX_MS:  # also NaN
            if ms > LATENCY_MAX_MS:
                self._count("latency_ms")
                return LATENCY_MAX_MS
            raise LineError("latency: must be a non-negative number")
        return int(ms * 1000 + 0.5) / 1000  # to the microsecond: $request_time * 1000 is 12.000000000000002

    def _client(self, value: Any) -> str:
        hit = self._ips.get(value) if type(value) is str else None
        if hit is not None:
            if hit is UNKNOWN_CLIENT:
                self._count("client_ip")
            return hit
        ip = _address(value)
        if type(value) is str and len(value) <= 128:
            if len(self._ips) >= _CACHE_MAX:
                self._ips.clear()
            self._ips[value] = UNKNOWN_CLIENT if ip is None else ip
        if ip is None:
            self._count("client_ip")
            return UNKNOWN_CLIENT
        return ip

    def _agent(self, value: Any) -> str:
        if value is None or value == "-":
            return ""
        if type(value) is not str:
            value = str(value)[:USER_AGENT_MAX]
        if len(value) > USER_AGENT_MAX:
            self._count("user_agent")
            return value[:USER_AGENT_MAX]
        return value

    def _count(self, field: str) -> None:
        self.normalised[field] = self.normalised.get(field, 0) + 1


def _address(value: Any) -> str | None:
    """The client address a logged value names: the first of a forwarded-for list, without
    a port ("203.0.113.9:5123", "[2001:db8::1]:443") or an IPv6 zone; None if none."""
    if type(value) is not str or value in _ABSENT or len(value) > 128:
        return None
    text = value.split(",", 1)[0].strip()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.partition("%")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
