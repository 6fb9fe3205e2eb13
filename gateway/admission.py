"""What the ASGI and the WSGI middleware share, whatever the framework: from a request
(as an ASGI scope: the WSGI middleware presents its environ as one) to what to ask the
limiter, then the headers of the answer and the request's event.

    plan = admission.plan(scope)       # None: not limited; a dict: refused (400) as it is;
                                       # a Verdict: refused offline; an Ask: ask the limiter
    verdict = admission.verdict(plan, await limiter.verify(*plan.args))   # or limiter.check
    admission.headers(verdict)         # rate-limit headers, X-Quotaflow-Event-Id, WWW-Authenticate
    admission.event(scope, verdict, status=..., response_bytes=..., latency_ms=...)

Only the call to the limiter differs (awaited by the ASGI middleware, blocking for at
most its Redis budget in the WSGI one), so both verify, refuse, count and publish alike.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

from quotaflow.core.settings import ConfigError, env_var
from quotaflow.gateway import identity, request_event
from quotaflow.gateway.headers import verdict_headers
from quotaflow.gateway.identity import DEFAULT_PRESENTED_KEY_HEADER, header_identity
from quotaflow.gateway.limiter import Verdict, malformed_key, valid_scope
from quotaflow.schemas.ids import check_id
from quotaflow.schemas.redis_keys import Decision

EVENT_ID_HEADER = "X-Quotaflow-Event-Id"  # the published event's id, as /check names it for nginx

Identify = Callable[[dict], "tuple[str, str] | None"]  # scope -> (api_key_id, org_id), None: not limited
RequiredScope = Callable[[dict], "str | None"]  # scope -> the scope the request needs, None: none


class Identity(NamedTuple):
    """Who a request is from, as the middleware verified it."""

    org_id: str
    api_key_id: str


class Ask(NamedTuple):
    """What to ask the limiter: ``verify(presented_key, required_scope)`` or, in the
    trusted mode, ``check(api_key_id, org_id)``."""

    trusted: bool
    args: tuple[str | None, str | None]


class Admission:
    def __init__(self, *, verifies_keys: bool, service: str, identify: Identify | None = None,
                 key_header: str = DEFAULT_PRESENTED_KEY_HEADER, required_scope: str | RequiredScope | None = None,
                 anonymous: bool = False, trusted_proxies: Iterable[str] = ()):
        self.service = check_id("service", service)  # a configuration error, said at start, not per request
        self.identify = identify
        if identify is None and not verifies_keys:
            raise ConfigError(f"{env_var('key_hash_secrets')} is empty, so API keys cannot be verified: configure "
                              "the limiter with the hash secrets, or pass identify= behind an auth layer that "
                              "verified the caller")
        if not callable(required_scope):
            valid_scope(required_scope)  # InvalidScope now rather than per request
        self.required_scope = required_scope
        self.key_header = key_header
        self._key_header = key_header.lower()
        self.anonymous = anonymous
        self.proxies = request_event.trusted_networks(trusted_proxies)
        self._names = identity.HEADERS if identify is header_identity else identity.FIELDS
        self._report = request_event.Reporter(self.service)

    def plan(self, scope: dict) -> Ask | Verdict | dict | None:
        """None: let the request through unlimited (no identity in the trusted mode, or no
        key presented where ``anonymous``); a dict: refuse it 400 with that body (a trusted
        identity breaking the id rule); a Verdict: refused without asking (two keys); an
        Ask: what to ask the limiter."""
        if self.identify is not None:
            ident = self.identify(scope)
            if ident is None:
                return None
            api_key_id, org_id = ident
            refused = identity.problem(api_key_id, org_id, self._names)
            if refused:
                return {"error": "invalid_identity", "reason": refused}
            return Ask(True, (api_key_id, org_id))
        headers = identity.scope_headers(scope)
        presented, two = identity.presented_key(headers.get("authorization"), headers.get(self._key_header),
                                                self.key_header)
        if two:
            return malformed_key(two)
        if presented is None and self.anonymous:
            return None
        needed = self.required_scope(scope) if callable(self.required_scope) else self.required_scope
        return Ask(False, (presented, needed))

    @staticmethod
    def verdict(ask: Ask, answer: Verdict | Decision) -> Verdict:
        """The limiter's answer to ``ask`` as a Verdict (check answers a Decision)."""
        if ask.trusted:
            api_key_id, org_id = ask.args
            return Verdict.of_decision(answer, org_id, api_key_id)
        return answer

    @staticmethod
    def counted(verdict: Verdict) -> bool:
        """Whether the request reached the limits of a known key: then it is published
        (admitted or 429), and its event releases the reservation."""
        return verdict.decision is not None and bool(verdict.org_id)

    def headers(self, verdict: Verdict) -> list[tuple[str, str]]:
        """The response's headers: the rate-limit ones, WWW-Authenticate for a refused key,
        and the id of the event the request is published with."""
        out = verdict_headers(verdict)
        if self.counted(verdict) and verdict.event_id:
            out.append((EVENT_ID_HEADER, verdict.event_id))
        return out

    @staticmethod
    def identity(verdict: Verdict) -> Identity | None:
        return Identity(verdict.org_id, verdict.api_key_id) if verdict.allowed and verdict.org_id else None

    def event(self, scope: dict, verdict: Verdict, *, status: object, response_bytes: int, latency_ms: float,
              routes: Iterable | None = None) -> dict:
        """The request's event (a dict the schema takes), its normalised fields counted."""
        event, normalised = request_event.build(
            scope, verdict.decision, api_key_id=verdict.api_key_id, org_id=verdict.org_id, service=self.service,
            status_code=status, response_bytes=response_bytes, latency_ms=latency_ms, routes=routes,
            proxies=self.proxies)
        self._report(normalised)
        return event
