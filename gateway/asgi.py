"""ASGI middleware: verify API keys, enforce limits in a Python service, and publish its
request events.

Each request presents its API key (``Authorization: Bearer <key>`` or the configured
header, X-Api-Key by default); the middleware verifies it and checks the limits of the
key and its org in one Redis round trip (``RateLimiter.verify``), exactly as the check
endpoint does. A refusal is answered with its status and reason: 401 (no key, not a
key, unknown, revoked, expired), 403 (the key lacks the scope the route needs), 429 with
the rate-limit headers. An admitted request gets the headers added to its response, and
the verified identity in ``scope["state"]["quotaflow"]`` (``request.state.quotaflow`` in
Starlette: org_id, api_key_id). Requests that reached the limits (admitted or 429) get
X-Quotaflow-Event-Id, and each emits one RequestEvent after the response, carrying the reservation's event_id and time,
so the processors can count it and release the reservation exactly; the event is built
to fit the schema whatever the request held (gateway/request_event.py), so an admitted
request is always counted. A refused key emits nothing: its requests count against no
one's limits. A WebSocket handshake is verified the same way, and closed before it is
accepted when refused.

The trusted mode, for a service behind an auth layer that verified the caller and sets
X-Api-Key-Id and X-Org-Id itself: pass ``identify=header_identity`` (or build the
middleware with ``from_settings`` and QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS=true).
Then those headers are taken as sent; an identity that breaks the id rule is answered
400 before anything is admitted or reserved.

``trusted_proxies`` (QUOTAFLOW_GATEWAY_TRUSTED_PROXIES with ``from_settings``): the
proxies whose X-Forwarded-For names the client in the event; by default the peer's
address is the client's. What is decided per request is gateway/admission.py, shared
with the WSGI middleware (gateway/wsgi.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

import orjson

from quotaflow.core.settings import Settings
from quotaflow.gateway import request_event
from quotaflow.gateway.admission import Admission, Identify, Identity, RequiredScope
from quotaflow.gateway.headers import refusal_body
from quotaflow.gateway.identity import DEFAULT_PRESENTED_KEY_HEADER, header_identity
from quotaflow.gateway.limiter import RateLimiter, Verdict

if TYPE_CHECKING:  # the service hands its emitter in: a gateway does not import a collector
    from quotaflow.collector.emitter import Emitter

__all__ = ["RateLimitMiddleware", "Identity", "endpoint_template", "header_identity"]


def endpoint_template(scope: dict, routes: list | None = None) -> str:
    """The route template of the request (the one the framework matched, else the first of
    ``routes`` matching it), else the path with id-like segments replaced, so a raw id
    never becomes an endpoint; always one the event schema takes."""
    return request_event.endpoint(scope, routes)[0]


class RateLimitMiddleware:
    """``required_scope``: the scope every request needs, or a function of the ASGI scope
    naming it per route (None: no scope needed). ``anonymous=True`` lets requests that
    present no key through, unlimited and unpublished (public routes); by default they
    are answered 401."""

    def __init__(self, app, limiter: RateLimiter, emitter: Emitter | None, *, service: str,
                 identify: Identify | None = None, key_header: str = DEFAULT_PRESENTED_KEY_HEADER,
                 required_scope: str | RequiredScope | None = None, anonymous: bool = False,
                 trusted_proxies: Iterable[str] = ()):
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        self.admission = Admission(verifies_keys=limiter.verifies_keys, service=service, identify=identify,
                                   key_header=key_header, required_scope=required_scope, anonymous=anonymous,
                                   trusted_proxies=trusted_proxies)
        self.service = self.admission.service
        self._routes = getattr(app, "routes", None)  # a Starlette app or router: match templates ourselves

    @classmethod
    def from_settings(cls, app, limiter: RateLimiter, emitter: Emitter | None, settings: Settings, *, service: str,
                      required_scope: str | RequiredScope | None = None, anonymous: bool = False
                      ) -> "RateLimitMiddleware":
        """Verifying keys from QUOTAFLOW_GATEWAY_KEY_HEADER (and Authorization), or in the
        trusted mode when QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS is true; clients behind
        QUOTAFLOW_GATEWAY_TRUSTED_PROXIES."""
        return cls(app, limiter, emitter, service=service, key_header=settings.gateway_key_header,
                   identify=header_identity if settings.gateway_trust_identity_headers else None,
                   required_scope=required_scope, anonymous=anonymous,
                   trusted_proxies=settings.gateway_trusted_proxies)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] == "websocket" and self.admission.identify is None:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = await self._verdict(scope)
        if verdict is None:  # nothing to limit
            await self.app(scope, receive, send)
            return
        if isinstance(verdict, dict):  # a trusted identity that breaks the id rule
            await _answer(send, 400, verdict)
            return
        started = time.perf_counter()
        extra = [(k.lower().encode(), v.encode()) for k, v in self.admission.headers(verdict)]
        seen = {"status": 500, "bytes": 0}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        counted = self.admission.counted(verdict)
        if verdict.allowed:
            ident = self.admission.identity(verdict)
            if ident is not None:
                scope.setdefault("state", {})["quotaflow"] = ident
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                if counted:
                    await self._emit(scope, verdict, seen, started)
            return
        await _answer(send_with_headers, verdict.status, refusal_body(verdict))
        if counted:
            await self._emit(scope, verdict, seen, started)

    async def _verdict(self, scope: dict) -> Verdict | dict | None:
        plan = self.admission.plan(scope)
        if plan is None or isinstance(plan, (dict, Verdict)):
            return plan
        if plan.trusted:
            return self.admission.verdict(plan, await self.limiter.check(*plan.args))
        return await self.limiter.verify(*plan.args)

    async def _websocket(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        """A WebSocket handshake presents its key as a request does and is verified and
        limited as one (no event is published for it: its reservation holds until it
        expires). Refused, it is closed before it is accepted (the server answers the
        handshake 403), the outcome and reason as the close reason."""
        verdict = await self._verdict(scope)
        if verdict is None:
            await self.app(scope, receive, send)
            return
        if not verdict.allowed:
            reason = f"{verdict.outcome}: {verdict.reason}"[:120]  # a close frame's reason: 123 bytes at most
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        ident = self.admission.identity(verdict)
        if ident is not None:
            scope.setdefault("state", {})["quotaflow"] = ident
        await self.app(scope, receive, send)

    async def _emit(self, scope: dict, verdict: Verdict, seen: dict, started: float) -> None:
        if self.emitter is None:
            return
        event = self.admission.event(scope, verdict, status=seen["status"], response_bytes=seen["bytes"],
                                     latency_ms=(time.perf_counter() - started) * 1000, routes=self._routes)
        await self.emitter.emit(event)


async def _answer(send: Callable, status: int, doc: dict) -> None:
    body = orjson.dumps(doc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
