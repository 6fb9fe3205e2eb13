"""The RequestEvent of a request a gateway served, built so that the event schema takes it.

An admitted request holds a reservation that only its event releases, and only a
counted event makes the hour and day limits see the request: an event the schema
refused would leave the request uncounted. So what the request and the server
supply (the Content-Length header, the path, the method, the status, the user
agent, the client address) is normalised into the schema's bounds instead of
refused, and each change is counted (``quotaflow_gateway_normalised_total{field}``)
and named in a log line: field names only, never values, which may carry secrets.

The ids are never normalised: two different ids made alike would be one tenant.
An id that breaks the rule is refused before the request is admitted
(gateway/identity.py), so no admitted request has one.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
import uuid
from typing import Any, Iterable

from prometheus_client import Counter
from starlette.routing import Match

from quotaflow.schemas.events import (
    BYTES_MAX,
    LATENCY_MAX_MS,
    METHODS,
    SCHEMA_VERSION,
    USER_AGENT_MAX,
)
from quotaflow.schemas.endpoints import TRUNCATED, fit_endpoint  # noqa: F401 (TRUNCATED: callers' name)
from quotaflow.schemas.redis_keys import Decision

log = logging.getLogger(__name__)

NORMALISED = Counter("quotaflow_gateway_normalised_total",
                     "Fields of request events the gateway changed to fit the event schema, by field", ["field"])

OTHER_METHOD = "OTHER"  # the schema's value for a method it does not list (WebDAV's PROPFIND, a typo, ...)
UNKNOWN_CLIENT = "0.0.0.0"  # no client address (a unix socket) or one that is not an IP
SERVER_ERROR = 500  # for a status outside 100..599: the server answered something HTTP has no code for
_DIGITS = re.compile(rb"[0-9]+")  # ASCII only: str.isdigit() takes '²' and other scripts' digits
_BYTES_MAX_DIGITS = len(str(BYTES_MAX))
_METHODS = frozenset(METHODS)
_LOG_EVERY_S = 60.0
_MAX_HOPS = 32  # X-Forwarded-For entries read at most: a longer chain is a client's invention


def endpoint(scope: dict, routes: Iterable | None = None) -> tuple[str, bool]:
    """(endpoint, normalised): the route template of the request (the one the framework
    matched, in scope["route"], else the first of ``routes`` matching it, for refused
    requests, which never reach the router), else its path with id-like segments
    replaced by {id}; then fitted to ENDPOINT_PATTERN and ENDPOINT_MAX. ``normalised``
    is whether that changed what the schema would have been given."""
    route = scope.get("route")
    if route is None:
        for candidate in routes or ():
            try:
                if candidate.matches(scope)[0] == Match.FULL:
                    route = candidate
                    break
            except Exception:  # a route that cannot judge this scope does not match it
                continue
    source = getattr(route, "path", None) if route is not None else None
    if not isinstance(source, str) or not source:
        source = scope.get("path")
        if not isinstance(source, str):
            source = "/"
    fitted = fit_endpoint(source)
    return fitted, fitted != source


def request_bytes(headers: dict) -> tuple[int, bool]:
    """(bytes, normalised) from the Content-Length header: ASCII digits only; a larger
    value than the schema's maximum is clamped to it, anything else counts as 0."""
    raw = headers.get(b"content-length")
    if raw is None:
        return 0, False
    if not _DIGITS.fullmatch(raw):
        return 0, True
    digits = raw.lstrip(b"0")
    if len(digits) > _BYTES_MAX_DIGITS or int(digits or b"0") > BYTES_MAX:  # int() of a long run would be refused
        return BYTES_MAX, True
    return int(digits or b"0"), False


def method(scope: dict) -> tuple[str, bool]:
    raw = scope.get("method")
    if isinstance(raw, str) and raw in _METHODS:
        return raw, False
    upper = raw.upper() if isinstance(raw, str) else ""
    return (upper if upper in _METHODS else OTHER_METHOD), True


def status(value: Any) -> tuple[int, bool]:
    if type(value) is int and 100 <= value <= 599:
        return value, False
    return SERVER_ERROR, True


Proxies = tuple  # of ipaddress networks: the trusted proxies (trusted_networks)


def trusted_networks(proxies: Iterable[str]) -> Proxies:
    """QUOTAFLOW_GATEWAY_TRUSTED_PROXIES (addresses or CIDR networks) as networks."""
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def client_host(scope: dict, proxies: Proxies = ()) -> object:
    """Who the client is: the peer's address, unless the peer is a trusted proxy; then the
    X-Forwarded-For entries are read right to left (the nearest hop first), skipping the
    trusted proxies, and the first other address is the client's. An entry that is not an
    address stops the walk at the hop that sent it (what came before it was written by
    nobody we trust). Without trusted proxies X-Forwarded-For is never read: any client
    can send one."""
    client = scope.get("client")
    host = client[0] if isinstance(client, (tuple, list)) and client else None
    if not proxies or not _in(host, proxies):
        return host
    hops = b",".join(v for k, v in scope.get("headers") or () if isinstance(k, bytes) and k.lower() == b"x-forwarded-for"
                     and isinstance(v, bytes))
    for entry in reversed(hops.split(b",")[-_MAX_HOPS:] if hops else []):
        text = entry.strip().decode("latin-1")
        try:
            address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            return host
        host = text
        if not any(address in net for net in proxies):
            return host
    return host  # every hop a trusted proxy: the furthest one named


def _in(host: object, proxies: Proxies) -> bool:
    if not isinstance(host, str) or len(host) > 64:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return any(address in net for net in proxies)


def client_ip(scope: dict, proxies: Proxies = ()) -> tuple[str, bool]:
    """The client's IP address (``client_host``), without an IPv6 zone (meaningless beyond
    the host, and not an address storage takes); 0.0.0.0 when there is none (a unix socket)."""
    host = client_host(scope, proxies)
    if isinstance(host, str) and len(host) <= 64:
        return _address(host)
    return UNKNOWN_CLIENT, True


@functools.lru_cache(maxsize=8192)  # clients come back: each address is parsed once while it does
def _address(host: str) -> tuple[str, bool]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return UNKNOWN_CLIENT, True
    if getattr(ip, "scope_id", None):
        return str(ipaddress.ip_address(host.partition("%")[0])), True
    return host, False


def user_agent(headers: dict) -> tuple[str, bool]:
    raw = headers.get(b"user-agent", b"")
    try:
        text, changed = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, changed = raw.decode("utf-8", errors="replace"), True
    if len(text) > USER_AGENT_MAX:
        return text[:USER_AGENT_MAX], True
    return text, changed


def build(scope: dict, decision: Decision, *, api_key_id: str, org_id: str, service: str, status_code: Any,
          response_bytes: int, latency_ms: float, routes: Iterable | None = None,
          proxies: Proxies = ()) -> tuple[dict, list[str]]:
    """(event, normalised field names) for one served request. The ids and the service
    are used as they are: the caller has checked them with the id rule."""
    headers = _headers(scope)
    normalised = []

    def take(field: str, answer: tuple[Any, bool]) -> Any:
        if answer[1]:
            normalised.append(field)
        return answer[0]

    event = {
        "schema_version": SCHEMA_VERSION,
        "event_id": decision.event_id or str(uuid.uuid4()),
        "ts_ms": decision.now_ms,  # the reservation's time: the event counts in the window it was admitted in
        "org_id": org_id, "api_key_id": api_key_id, "service": service,
        "endpoint": take("endpoint", endpoint(scope, routes)),
        "method": take("method", method(scope)),
        "status": take("status", status(status_code)),
        "latency_ms": take("latency_ms", _clamp(round(latency_ms, 3), 0.0, LATENCY_MAX_MS)),
        "request_bytes": take("request_bytes", request_bytes(headers)),
        "response_bytes": take("response_bytes", _clamp(response_bytes, 0, BYTES_MAX)),
        "client_ip": take("client_ip", client_ip(scope, proxies)),
        "user_agent": take("user_agent", user_agent(headers)),
    }
    return event, normalised


def _clamp(value: int | float, low: int | float, high: int | float) -> tuple[int | float, bool]:
    clamped = min(max(value, low), high)
    return clamped, clamped != value


def _headers(scope: dict) -> dict[bytes, bytes]:
    """The request headers by lower-case name (the last of repeated ones), as bytes."""
    out = {}
    for pair in scope.get("headers") or ():
        try:
            name, value = pair
            name = name if isinstance(name, bytes) else str(name).encode("latin-1", errors="replace")
            value = value if isinstance(value, bytes) else str(value).encode("latin-1", errors="replace")
        except (TypeError, ValueError):
            continue
        out[name.lower()] = value
    return out


class Reporter:
    """Counts normalised fields and says so in the log, at most once a minute per set of
    fields (with how many events it stands for): one misbehaving client must not flood it."""

    def __init__(self, service: str):
        self.service = service
        self._last: dict[tuple[str, ...], float] = {}
        self._since: dict[tuple[str, ...], int] = {}

    def __call__(self, fields: list[str]) -> None:
        if not fields:
            return
        for field in fields:
            NORMALISED.labels(field).inc()
        key = tuple(fields)
        self._since[key] = self._since.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            log.warning("request event fields normalised to fit the event schema",
                        extra={"fields": list(key), "events": self._since.pop(key), "service": self.service})
            self._last[key] = now

