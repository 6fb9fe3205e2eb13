"""ASGI middleware: enforce limits in a Python service and publish its request events.

Each request of an identified caller is checked (one Redis round trip); a
refusal is answered 429 with the rate-limit headers, an admitted request gets
the headers added to its response. Either way one RequestEvent is emitted after
the response, carrying the reservation's event_id and time, so the processors
can count it and release the reservation exactly. The event is built to fit the
schema whatever the request held (gateway/request_event.py), so an admitted
request is always counted; an identity that breaks the id rule is answered 400
before anything is admitted or reserved.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Awaitable, Callable

import orjson

from quotaflow.gateway import identity, request_event
from quotaflow.gateway.headers import rate_limit_headers
from quotaflow.gateway.identity import header_identity
from quotaflow.gateway.limiter import RateLimiter
from quotaflow.schemas.ids import check_id
from quotaflow.schemas.redis_keys import Decision

if TYPE_CHECKING:  # the service hands its emitter in: a gateway does not import a collector
    from quotaflow.collector.emitter import Emitter

__all__ = ["RateLimitMiddleware", "endpoint_template", "header_identity"]

Identify = Callable[[dict], "tuple[str, str] | None"]  # scope -> (api_key_id, org_id), None: not limited


def endpoint_template(scope: dict, routes: list | None = None) -> str:
    """The route template of the request (the one the framework matched, else the first of
    ``routes`` matching it), else the path with id-like segments replaced, so a raw id
    never becomes an endpoint; always one the event schema takes."""
    return request_event.endpoint(scope, routes)[0]


class RateLimitMiddleware:
    def __init__(self, app, limiter: RateLimiter, emitter: Emitter | None, *, service: str,
                 identify: Identify = header_identity):
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        self.service = check_id("service", service)  # a configuration error, said at start, not per request
        self.identify = identify
        self._names = identity.HEADERS if identify is header_identity else identity.FIELDS
        self._routes = getattr(app, "routes", None)  # a Starlette app or router: match templates ourselves
        self._report = request_event.Reporter(self.service)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        ident = self.identify(scope) if scope["type"] == "http" else None
        if ident is None:
            await self.app(scope, receive, send)
            return
        api_key_id, org_id = ident
        refused = identity.problem(api_key_id, org_id, self._names)
        if refused:
            await _answer(send, 400, {"error": "invalid identity", "reason": refused})
            return
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
        await _answer(send_with_headers, 429, {"error": "rate limit exceeded", "window": decision.denied_by,
                                               "retry_after_s": decision.retry_after_s})
        await self._emit(scope, decision, api_key_id, org_id, seen, started)

    async def _emit(self, scope: dict, decision: Decision, api_key_id: str, org_id: str, seen: dict,
                    started: float) -> None:
        if self.emitter is None:
            return
        event, normalised = request_event.build(
            scope, decision, api_key_id=api_key_id, org_id=org_id, service=self.service, status_code=seen["status"],
            response_bytes=seen["bytes"], latency_ms=(time.perf_counter() - started) * 1000, routes=self._routes)
        self._report(normalised)
        await self.emitter.emit(event)


async def _answer(send: Callable, status: int, doc: dict) -> None:
    body = orjson.dumps(doc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
