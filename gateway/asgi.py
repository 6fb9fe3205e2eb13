"""ASGI middleware: enforce limits in a Python service and publish its request events.

Each request of an identified caller is checked (one Redis round trip); a
refusal is answered 429 with the rate-limit headers, an admitted request gets
the headers added to its response. Either way one RequestEvent is emitted after
the response, carrying the reservation's event_id and time, so the processors
can count it and release the reservation exactly.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Awaitable, Callable

import orjson
from starlette.routing import Match

from collector.emitter import Emitter
from gateway.headers import rate_limit_headers
from gateway.limiter import RateLimiter
from schemas.events import ENDPOINT_MAX, RAW_ID_SEGMENT, USER_AGENT_MAX
from schemas.redis_keys import Decision

Identify = Callable[[dict], "tuple[str, str] | None"]  # scope -> (api_key_id, org_id), None: not limited

# A path segment replaced by {id}: every segment the event schema refuses as a raw id, and
# also runs of 16 or more hex digits and dashes in other id formats, which the schema
# accepts but which would still make an endpoint per id.
_RAW_ID = re.compile(rf"^(?:{RAW_ID_SEGMENT}|[0-9a-fA-F-]{{16,}})$")


def header_identity(scope: dict) -> tuple[str, str] | None:
    """Default identity: the X-Api-Key-Id and X-Org-Id request headers (set by an auth layer in front)."""
    headers = dict(scope.get("headers") or [])
    key, org = headers.get(b"x-api-key-id"), headers.get(b"x-org-id")
    return (key.decode(), org.decode()) if key and org else None


def endpoint_template(scope: dict, routes: list | None = None) -> str:
    """The route template of the request: the one the framework matched (Starlette sets
    scope["route"]), else the first of ``routes`` matching it (for refused requests,
    which never reach the router), else the path with id-like segments replaced, so a
    raw id never becomes an endpoint."""
    route = scope.get("route")
    if route is None:
        for candidate in routes or ():
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    if route is not None and getattr(route, "path", None):
        return route.path[:ENDPOINT_MAX]
    parts = [("{id}" if _RAW_ID.match(p) else p) for p in scope.get("path", "/").split("/")]
    return ("/".join(parts) or "/")[:ENDPOINT_MAX]


def _content_length(headers: dict) -> int:
    raw = headers.get(b"content-length", b"0")
    return int(raw) if raw.isdigit() else 0


class RateLimitMiddleware:
    def __init__(self, app, limiter: RateLimiter, emitter: Emitter | None, *, service: str,
                 identify: Identify = header_identity):
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        self.service = service
        self.identify = identify
        self._routes = getattr(app, "routes", None)  # a Starlette app or router: match templates ourselves

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        ident = self.identify(scope) if scope["type"] == "http" else None
        if ident is None:
            await self.app(scope, receive, send)
            return
        api_key_id, org_id = ident
        started = time.perf_counter()
        decision = await self.limiter.check(api_key_id, org_id)
        extra = [(k.lower().encode(), v.encode()) for k, v in rate_limit_headers(decision)]
        seen = {"status": 500, "bytes": 0}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        if decision.allowed:
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                await self._emit(scope, decision, api_key_id, org_id, seen, started)
            return
        body = orjson.dumps({"error": "rate limit exceeded", "window": decision.denied_by,
                             "retry_after_s": decision.retry_after_s})
        await send_with_headers({"type": "http.response.start", "status": 429,
                                 "headers": [(b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())]})
        await send_with_headers({"type": "http.response.body", "body": body})
        await self._emit(scope, decision, api_key_id, org_id, seen, started)

    async def _emit(self, scope: dict, decision: Decision, api_key_id: str, org_id: str, seen: dict,
                    started: float) -> None:
        if self.emitter is None:
            return
        headers = dict(scope.get("headers") or [])
        client = scope.get("client") or ("0.0.0.0", 0)
        await self.emitter.emit({
            "schema_version": 1,
            "event_id": decision.event_id or str(uuid.uuid4()),
            "ts_ms": decision.now_ms,  # the reservation's time: the event counts in the window it was admitted in
            "org_id": org_id, "api_key_id": api_key_id, "service": self.service,
            "endpoint": endpoint_template(scope, self._routes), "method": scope.get("method", "GET"), "status": seen["status"],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "request_bytes": _content_length(headers), "response_bytes": seen["bytes"],
            "client_ip": client[0], "user_agent": headers.get(b"user-agent", b"").decode(errors="replace")[:USER_AGENT_MAX],
        })
