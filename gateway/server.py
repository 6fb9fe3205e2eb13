"""The HTTP check endpoint, for gateways that are not Python.

    GET|POST /check        the caller's API key in "Authorization: Bearer <key>" or in
                           X-Api-Key (QUOTAFLOW_GATEWAY_KEY_HEADER); the scope the request
                           needs, if any, in X-Quotaflow-Scope (QUOTAFLOW_GATEWAY_SCOPE_HEADER)
                           or ?scope= (QUOTAFLOW_GATEWAY_SCOPE_PARAM), set by the gateway's
                           configuration, never by the client
      -> 200 (admitted), with the rate-limit headers, the verified identity for the
         upstream (X-Quotaflow-Org-Id, X-Quotaflow-Api-Key-Id), and
         X-Quotaflow-Event-Id / X-Quotaflow-Event-Ts: publish the request's event
         with these so the processors release the reservation exactly.
      -> 401 no key, not a key (shape or checksum: refused without asking Redis), an
             unknown, revoked or expired key, with WWW-Authenticate
      -> 403 the key lacks the required scope
      -> 429 rate limited (or Redis unavailable and failing closed), with the headers; when
             rate limited, the verified identity too, for the proxy's access log
      -> 400 a required scope that is not one
         Every refusal says why: JSON {"error": code, "reason": words}, and the same in
         X-Quotaflow-Code / X-Quotaflow-Error, with X-Quotaflow-Status (the status the
         client should see). Never the key.
      -> 431 when the request line and headers exceed protocol.MAX_HEAD_BYTES.
    GET /metrics           Prometheus metrics of this process (quotaflow/core/metrics.py)

The trusted mode (QUOTAFLOW_GATEWAY_TRUST_IDENTITY_HEADERS=true, off by default) reads the
identity from X-Api-Key-Id and X-Org-Id as sent and verifies nothing: only for an auth
layer in front that verified the caller and sets those headers itself. Then a missing
header is a 401, an id that breaks the rule of schemas/ids.py a 400 naming the header
and the rule, and nothing is read from or written to Redis.

Envoy's ext_authz (HTTP mode) forwards a refusal's status and headers as they
are. nginx's auth_request only understands 2xx, 401 and 403, so nginx asks with
``?deny_status=403&invalid_status=401`` (429 and 400 are answered as those) and answers
the client with X-Quotaflow-Status itself (see deploy/nginx/quotaflow.conf).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from quotaflow.core import metrics
from quotaflow.core.settings import ConfigError, Settings, env_var
from quotaflow.gateway import identity
from quotaflow.gateway.headers import (
    CODE_HEADER,
    ERROR_HEADER,
    STATUS_HEADER,
    identity_headers,
    refusal_body,
    verdict_headers,
)
from quotaflow.gateway.limiter import RATE_LIMITED, InvalidScope, RateLimiter, Verdict, malformed_key
from quotaflow.gateway.protocol import MAX_HEAD_BYTES, BoundedH11Protocol

DENY_STATUSES = {"429": 429, "403": 403, "401": 401}
INVALID_STATUSES = {"400": 400, "401": 401, "403": 403}
INVALID_IDENTITY = "invalid_identity"
MISSING_IDENTITY = "missing_identity"
INVALID_SCOPE = "invalid_scope"


@dataclass(frozen=True)
class CheckConfig:
    """Where /check reads what it verifies (QUOTAFLOW_GATEWAY_* settings)."""

    key_header: str = identity.DEFAULT_PRESENTED_KEY_HEADER
    scope_header: str = "X-Quotaflow-Scope"
    scope_param: str = "scope"
    trust_identity_headers: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "CheckConfig":
        return cls(key_header=settings.gateway_key_header, scope_header=settings.gateway_scope_header,
                   scope_param=settings.gateway_scope_param,
                   trust_identity_headers=settings.gateway_trust_identity_headers)


def _refused(status: int, code: str, reason: str, headers: list[tuple[str, str]] | None = None,
             doc: dict | None = None, as_status: int | None = None) -> Response:
    """A refusal: the JSON body and the three headers that repeat it for proxies. ``as_status``
    is the status answered (nginx's auth_request understands only 401 and 403), ``status``
    the one the client should see."""
    out = dict(headers or [])
    out.update({STATUS_HEADER: str(status), CODE_HEADER: code, ERROR_HEADER: reason})
    return JSONResponse(doc or {"error": code, "reason": reason}, status_code=as_status or status, headers=out)


def create_app(limiter: RateLimiter, config: CheckConfig = CheckConfig()) -> Starlette:
    if not config.trust_identity_headers and not limiter.verifies_keys:
        raise ConfigError(f"{env_var('key_hash_secrets')} is empty, so the gateway cannot verify API keys: set it "
                          f"(the secrets the keys were hashed with), or set {env_var('gateway_trust_identity_headers')}"
                          "=true behind an auth layer that verified the caller and sets X-Api-Key-Id and X-Org-Id")

    def answer(v: Verdict, deny_status: int, invalid_status: int) -> Response:
        headers = verdict_headers(v)
        if v.event_id:
            headers += [("X-Quotaflow-Event-Id", v.event_id), ("X-Quotaflow-Event-Ts", str(v.now_ms))]
        if v.allowed:
            return Response(status_code=200, headers=dict(headers + identity_headers(v)))
        if v.outcome == RATE_LIMITED:
            # the verified identity of a rate-limited request too, for the proxy's access log:
            # its event (status 429, never counted) is then the key's denial, not a line without
            # an org. Not for other refusals: an event of theirs would count as a request.
            headers += identity_headers(v)
        as_status = deny_status if v.status == 429 else invalid_status if v.status == 400 else v.status
        return _refused(v.status, v.outcome, v.reason, headers, refusal_body(v), as_status)

    async def verified(request: Request) -> Verdict | Response:
        presented, two = identity.presented_key(request.headers.get("authorization"),
                                                request.headers.get(config.key_header), config.key_header)
        if two:
            return malformed_key(two)
        # The scope comes from the gateway's configuration. Named twice, differently, one of the
        # two is not the configuration's (a client's header a proxy passed on): refused, not guessed.
        from_header, from_param = request.headers.get(config.scope_header), request.query_params.get(config.scope_param)
        if from_header and from_param and from_header != from_param:
            return _refused(400, INVALID_SCOPE, f"two different required scopes ({config.scope_header} and "
                                                f"?{config.scope_param}=): the gateway must set one")
        scope = from_header or from_param
        try:
            return await limiter.verify(presented, scope)
        except InvalidScope as exc:
            return _refused(400, INVALID_SCOPE, str(exc))

    async def trusted(request: Request) -> Verdict | Response:
        key, org = request.headers.get(identity.KEY_HEADER), request.headers.get(identity.ORG_HEADER)
        if not key or not org:
            return _refused(401, MISSING_IDENTITY, f"{identity.KEY_HEADER} and {identity.ORG_HEADER} headers are "
                                                   "required")
        problem = identity.problem(key, org)
        if problem:
            return _refused(400, INVALID_IDENTITY, problem)
        return Verdict.of_decision(await limiter.check(key, org), org, key)

    async def check(request: Request) -> Response:
        deny_status = DENY_STATUSES.get(request.query_params.get("deny_status", "429"))
        if deny_status is None:
            return PlainTextResponse("deny_status must be 429, 403 or 401\n", status_code=400)
        invalid_status = INVALID_STATUSES.get(request.query_params.get("invalid_status", "400"))
        if invalid_status is None:
            return PlainTextResponse("invalid_status must be 400, 401 or 403\n", status_code=400)
        v = await (trusted(request) if config.trust_identity_headers else verified(request))
        if isinstance(v, Response):
            if v.status_code == 400:
                v.status_code = invalid_status
            return v
        return answer(v, deny_status, invalid_status)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await limiter.aclose()

    return Starlette(routes=[Route("/check", check, methods=["GET", "POST", "HEAD"]), Route("/healthz", healthz),
                             Route("/metrics", metrics.asgi_app)],
                     lifespan=lifespan)


def serve(limiter: RateLimiter, *, host: str, port: int, log_config: dict,
          config: CheckConfig = CheckConfig()) -> None:
    """Serve the endpoint with uvicorn, its HTTP limits set here rather than left to
    defaults: h11 with the bounded protocol (431 for a head too large, an answer the
    client can read), no access log (paths and headers may carry secrets)."""
    import uvicorn

    app = create_app(limiter, config)  # refuses a configuration it cannot serve, before binding the port
    uvicorn.run(app, host=host, port=port, log_config=log_config, access_log=False,
                http=BoundedH11Protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
