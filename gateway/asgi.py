"""ASGI middleware: verify API keys, enforce limits in a Python service, and publish its
request events.

Each request presents its API key (``Authorization: Bearer <key>`` or the configured
header, X-Api-Key by default); the middleware verifies it and checks the limits of the
key and its org in one Redis round trip (``RateLimiter.verify``), exactly as the check
endpoint does. A refusal is answered with its status and reason: 401 (no key, not a
key, unknown, revoked, expired), 403 (the key lacks the scope the route needs), 429 with
the rate-limit headers. An admitted request gets the headers added to its response, and
the verified identity in ``scope["state"]["quotaflow"]`` (``request.state.quotaflow`` in
Starlette: org_id, api_key_id). Requests that reached the limits (admitted or 429) each
emit one RequestEvent after the response, carrying the reservation's event_id and time,
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
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Awaitable, Callable, NamedTuple

import orjson

from quotaflow.core.settings import ConfigError, Settings, env_var
from quotaflow.gateway import identity, request_event
from quotaflow.gateway.headers import refusal_body, verdict_headers
from quotaflow.gateway.identity import DEFAULT_PRESENTED_KEY_HEADER, header_identity
from quotaflow.gateway.limiter import RateLimiter, Verdict, malformed_key, valid_scope
from quotaflow.schemas.ids import check_id

if TYPE_CHECKING:  # the service hands its emitter in: a gateway does not import a collector
    from quotaflow.collector.emitter import Emitter

__all__ = ["RateLimitMiddleware", "Identity", "endpoint_template", "header_identity"]

Identify = Callable[[dict], "tuple[str, str] | None"]  # scope -> (api_key_id, org_id), None: not limited
RequiredScope = Callable[[dict], "str | None"]  # scope -> the scope the request needs, None: none


class Identity(NamedTuple):
    """Who a request is from, as the middleware verified it (scope["state"]["quotaflow"])."""

    org_id: str
    api_key_id: str


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
                 required_scope: str | RequiredScope | None = None, anonymous: bool = False):
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        self.service = check_id("service", service)  # a configuration error, said at start, not per request
        self.identify = identify
        if identify is None and not limiter.verifies_keys:
            raise ConfigError(f"{env_var('key_hash_secrets')} is empty, so API keys cannot be verified: configure "
                              "the limiter with the hash secrets, or pass identify= behind an auth layer that "
                              "verified the caller")
        if not callable(required_scope):
            valid_scope(required_scope)  # InvalidScope now rather than per request
        self.required_scope = required_scope
        self.key_header = key_header
        self._key_header = key_header.lower()
        self.anonymous = anonymous
        self._names = identity.HEADERS if identify is header_identity else identity.FIELDS
        self._routes = getattr(app, "routes", None)  # a Starlette app or router: match templates ourselves
        self._report = request_event.Reporter(self.service)

    @classmethod
    def from_settings(cls, app, limiter: RateLimiter, emitter: Emitter | None, settings: Settings, *, service: str,
                      required_scope: str | RequiredScope | None = None, anonymous: bool = False
                      ) -> "RateLimitMiddleware":
        """Verifying keys from QUOTAFLOW_GATEWAY_KEY_HEADER (and Authorization), or in the
        trusted mode when QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS is true."""
        return cls(app, limiter, emitter, service=service, key_header=settings.gateway_key_header,
                   identify=header_identity if settings.gateway_trust_identity_headers else None,
                   required_scope=required_scope, anonymous=anonymous)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] == "websocket" and self.identify is None:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = await (self._trusted(scope) if self.identify is not None else self._verified(scope))
        if verdict is None:  # nothing to limit
            await self.app(scope, receive, send)
            return
        if isinstance(verdict, dict):  # a trusted identity that breaks the id rule
            await _answer(send, 400, verdict)
            return
        started = time.perf_counter()
        extra = [(k.lower().encode(), v.encode()) for k, v in verdict_headers(verdict)]
        seen = {"status": 500, "bytes": 0}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        counted = verdict.decision is not None and bool(verdict.org_id)  # reached the limits of a known key
        if verdict.allowed:
            if verdict.org_id:
                scope.setdefault("state", {})["quotaflow"] = Identity(verdict.org_id, verdict.api_key_id)
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                if counted:
                    await self._emit(scope, verdict, seen, started)
            return
        await _answer(send_with_headers, verdict.status, refusal_body(verdict))
        if counted:
            await self._emit(scope, verdict, seen, started)

    async def _websocket(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        """A WebSocket handshake presents its key as a request does and is verified and
        limited as one (no event is published for it: its reservation holds until it
        expires). Refused, it is closed before it is accepted (the server answers the
        handshake 403), the outcome and reason as the close reason."""
        verdict = await self._verified(scope)
        if verdict is None:
            await self.app(scope, receive, send)
            return
        if not verdict.allowed:
            reason = f"{verdict.outcome}: {verdict.reason}"[:120]  # a close frame's reason: 123 bytes at most
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        if verdict.org_id:
            scope.setdefault("state", {})["quotaflow"] = Identity(verdict.org_id, verdict.api_key_id)
        await self.app(scope, receive, send)

    async def _verified(self, scope: dict) -> Verdict | None:
        headers = identity.scope_headers(scope)
        presented, two = identity.presented_key(headers.get("authorization"), headers.get(self._key_header),
                                                self.key_header)
        if two:
            return malformed_key(two)
        if presented is None and self.anonymous:
            return None
        needed = self.required_scope(scope) if callable(self.required_scope) else self.required_scope
        return await self.limiter.verify(presented, needed)

    async def _trusted(self, scope: dict) -> Verdict | dict | None:
        ident = self.identify(scope)
        if ident is None:
            return None
        api_key_id, org_id = ident
        refused = identity.problem(api_key_id, org_id, self._names)
        if refused:
            return {"error": "invalid_identity", "reason": refused}
        return Verdict.of_decision(await self.limiter.check(api_key_id, org_id), org_id, api_key_id)

    async def _emit(self, scope: dict, verdict: Verdict, seen: dict, started: float) -> None:
        if self.emitter is None:
            return
        event, normalised = request_event.build(
            scope, verdict.decision, api_key_id=verdict.api_key_id, org_id=verdict.org_id, service=self.service,
            status_code=seen["status"], response_bytes=seen["bytes"], latency_ms=(time.perf_counter() - started) * 1000,
            routes=self._routes)
        self._report(normalised)
        await self.emitter.emit(event)


async def _answer(send: Callable, status: int, doc: dict) -> None:
    body = orjson.dumps(doc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
