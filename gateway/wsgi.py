"""WSGI middleware (Flask, Django, any WSGI app): the ASGI middleware's behaviour for
threaded services, sharing its logic (gateway/admission.py).

Each request presents its API key (``Authorization: Bearer <key>`` or the configured
header); the middleware verifies it and checks the limits of the key and its org in one
Redis round trip (``SyncRateLimiter.verify``, blocking for at most its Redis budget),
and answers a refusal itself: 401, 403, or 429 with the rate-limit headers, the reason
as JSON. An admitted request reaches the app with the verified identity in
``environ["quotaflow"]`` (org_id, api_key_id); its response gets the rate-limit headers
and X-Quotaflow-Event-Id. Each request that reached the limits (admitted or 429) is
published once its response is done (the WSGI server closes the body), with the
reservation's event id and time, the route template as its endpoint, and the client's
address (behind ``trusted_proxies`` only, from X-Forwarded-For).

Publishing never blocks the request thread: ``emitter`` is anything with a non-blocking
``emit(event)``, such as collector/background.py's BackgroundEmitter (an Emitter on a
loop and thread of its own, spooling to disk when Kafka is away).

    limiter = SyncRateLimiter.from_settings(settings)
    emitter = BackgroundEmitter(Emitter.from_settings(settings)).start()
    app.wsgi_app = RateLimitMiddleware.from_settings(app.wsgi_app, limiter, emitter, settings, service="shop",
                                                     route=flask_route(app))

The route template: ``route`` is a function of the environ naming the template of the
request (Flask's ``flask_route(app)`` matches the app's URL map, Django's
``django_route()`` resolves the path with its URLconf, refused requests included);
without one, the path with id-like segments replaced by {id}.
"""

from __future__ import annotations

import functools
import re
import time
from http import HTTPStatus
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol

import orjson

from quotaflow.core.settings import Settings
from quotaflow.gateway.admission import Admission, Identify, Identity, RequiredScope
from quotaflow.gateway.headers import refusal_body
from quotaflow.gateway.identity import DEFAULT_PRESENTED_KEY_HEADER, header_identity
from quotaflow.gateway.limiter import SyncRateLimiter, Verdict

__all__ = ["RateLimitMiddleware", "Identity", "django_route", "flask_route", "header_identity", "scope_of"]

Route = Callable[[dict], "str | None"]  # environ -> the request's route template, None: unknown

ENVIRON_KEY = "quotaflow"  # where the verified Identity is put for the app
_RULE_KEY = "quotaflow.route"  # the rule Flask matched (flask_route)


class Publisher(Protocol):
    def emit(self, event: dict) -> Any: ...


class _Template(NamedTuple):
    path: str  # what request_event.endpoint reads of a matched route


# Werkzeug's <converter(args):name> / <name>, Django's <converter:name>: as {name}
_PLACEHOLDER = re.compile(r"<(?:[^<>:]+:)?([^<>:]+)>")


@functools.lru_cache(maxsize=4096)
def template_of(rule: str) -> str:
    """A framework's route rule as a template: /items/<int:item_id> -> /items/{item_id}."""
    out = _PLACEHOLDER.sub(r"{\1}", rule)
    return out if out.startswith("/") else "/" + out


def flask_route(app) -> Route:
    """The template of the rule the Flask ``app``'s URL map matches for a request (None
    when none does: the path then stands in, ids replaced). The rule Flask matched is
    remembered in the environ by a URL value preprocessor this registers on ``app``, so
    an admitted request is not matched twice; a refused one, which never reached Flask,
    is matched here."""
    from flask import request

    @app.url_value_preprocessor
    def remember_rule(endpoint: str | None, values: dict | None) -> None:
        if request.url_rule is not None:
            request.environ[_RULE_KEY] = request.url_rule.rule

    def route(environ: dict) -> str | None:
        rule = environ.get(_RULE_KEY)
        if rule is None:
            try:
                matched, _ = app.url_map.bind_to_environ(environ, server_name=app.config.get("SERVER_NAME")).match(
                    return_rule=True)
            except Exception:  # no rule (404, 405, a redirect): no template
                return None
            rule = matched.rule
        return template_of(rule)

    return route


# A regular-expression route (Django's re_path) is not a template: the path stands in for it
_REGEX = re.compile(r"[\\^$()\[\]?*+|]")


def django_route(urlconf: str | None = None) -> Route:
    """The template of the URL pattern Django's URLconf (``urlconf``, or the project's
    ROOT_URLCONF) resolves a request's path to, includes joined: ``items/<int:item_id>``
    -> /items/{item_id}. None when no pattern matches or the pattern is a regular
    expression (the path then stands in, ids replaced). Resolved from PATH_INFO, so a
    refused request, which never reached Django, has its template too."""
    from django.urls import Resolver404, resolve

    def route(environ: dict) -> str | None:
        try:
            match = resolve(environ.get("PATH_INFO") or "/", urlconf)
        except Resolver404:
            return None
        pattern = match.route
        return template_of(pattern) if pattern is not None and not _REGEX.search(pattern) else None

    return route


@functools.lru_cache(maxsize=1024)  # the same few names come with every request
def _header_key(name: str) -> bytes | None:
    """A request header's name as ASGI gives it, for an environ key (HTTP_USER_AGENT ->
    b"user-agent"); None for a key that is not a header."""
    if name.startswith("HTTP_"):
        name = name[5:]
    elif name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return None
    return name.replace("_", "-").lower().encode("latin-1", errors="replace")


def scope_of(environ: dict) -> dict:
    """The request as the ASGI scope the shared logic reads: method, path, the headers as
    (lower-case bytes, bytes) pairs, the peer's address. Identify and required_scope
    functions get this; the environ itself is under "environ"."""
    headers = []
    for name, value in environ.items():
        key = _header_key(name)
        if key is not None and type(value) is str and value:
            headers.append((key, value.encode("latin-1", errors="replace")))
    path = environ.get("PATH_INFO") or "/"
    if isinstance(path, str):  # PEP 3333: the bytes as latin-1; the URL's UTF-8 read back as such
        try:
            path = path.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return {"type": "http", "method": environ.get("REQUEST_METHOD", "GET"),
            "path": (environ.get("SCRIPT_NAME") or "") + path, "headers": headers,
            "client": (environ.get("REMOTE_ADDR"), 0), "environ": environ}


class RateLimitMiddleware:
    """``required_scope``: the scope every request needs, or a function of the request's
    scope (``scope_of``; the environ under "environ") naming it per route. ``anonymous=True``
    lets requests that present no key through, unlimited and unpublished."""

    def __init__(self, app, limiter: SyncRateLimiter, emitter: Publisher | None, *, service: str,
                 identify: Identify | None = None, key_header: str = DEFAULT_PRESENTED_KEY_HEADER,
                 required_scope: str | RequiredScope | None = None, anonymous: bool = False,
                 trusted_proxies: Iterable[str] = (), route: Route | None = None):
        self.app = app
        self.limiter = limiter
        self.emitter = emitter
        self.route = route
        self.admission = Admission(verifies_keys=limiter.verifies_keys, service=service, identify=identify,
                                   key_header=key_header, required_scope=required_scope, anonymous=anonymous,
                                   trusted_proxies=trusted_proxies)

    @classmethod
    def from_settings(cls, app, limiter: SyncRateLimiter, emitter: Publisher | None, settings: Settings, *,
                      service: str, required_scope: str | RequiredScope | None = None, anonymous: bool = False,
                      route: Route | None = None) -> "RateLimitMiddleware":
        return cls(app, limiter, emitter, service=service, key_header=settings.gateway_key_header,
                   identify=header_identity if settings.gateway_trust_identity_headers else None,
                   required_scope=required_scope, anonymous=anonymous,
                   trusted_proxies=settings.gateway_trusted_proxies, route=route)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        scope = scope_of(environ)
        plan = self.admission.plan(scope)
        if plan is None:
            return self.app(environ, start_response)
        if isinstance(plan, dict):  # a trusted identity that breaks the id rule
            return _answer(start_response, 400, plan, [])
        if isinstance(plan, Verdict):
            verdict = plan
        elif plan.trusted:
            verdict = self.admission.verdict(plan, self.limiter.check(*plan.args))
        else:
            verdict = self.limiter.verify(*plan.args)
        started = time.perf_counter()
        extra = self.admission.headers(verdict)
        counted = self.admission.counted(verdict)
        if not verdict.allowed:
            body = _answer(start_response, verdict.status, refusal_body(verdict), extra)
            if counted:
                self._emit(scope, verdict, verdict.status, len(body[0]), started)
            return body
        ident = self.admission.identity(verdict)
        if ident is not None:
            environ[ENVIRON_KEY] = ident
        seen = {"status": 500}

        def start_with_headers(status: str, headers: list, exc_info: Any = None) -> Callable:
            try:
                seen["status"] = int(status[:3])
            except (TypeError, ValueError):
                seen["status"] = 500
            return start_response(status, [*headers, *extra], exc_info)

        try:
            body = self.app(environ, start_with_headers)
        except BaseException:
            if counted:
                self._emit(scope, verdict, 500, 0, started)
            raise
        if not counted:
            return body
        return _Counted(body, lambda n: self._emit(scope, verdict, seen["status"], n, started))

    def _emit(self, scope: dict, verdict: Verdict, status: int, response_bytes: int, started: float) -> None:
        if self.emitter is None:
            return
        if self.route is not None:
            try:
                template = self.route(scope["environ"])
            except Exception:  # a route function that fails names no template
                template = None
            if template:
                scope["route"] = _Template(template)
        self.emitter.emit(self.admission.event(scope, verdict, status=status, response_bytes=response_bytes,
                                               latency_ms=(time.perf_counter() - started) * 1000))


class _Counted:
    """The app's response body, its bytes counted as the server sends them; the request's
    event is published when the server closes it (the response is done), once."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int], None]):
        self._body = body
        self._done = done
        self._bytes = 0
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._bytes += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._bytes)


def _answer(start_response: Callable, status: int, doc: dict, headers: list[tuple[str, str]]) -> list[bytes]:
    body = orjson.dumps(doc)
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]
