"""The WSGI middleware in front of a real Django project (this module is its URLconf),
served by a real WSGI server, with the real Redis and Kafka: keys verified, limits
enforced, and each request published under its Django route's template."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from django.http import JsonResponse
from django.urls import include, path, re_path

from quotaflow.gateway.wsgi import ENVIRON_KEY, django_route
from quotaflow.schemas.events import decode_record
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.key_records import SECRETS, new_key
from tests.pipeline import minute_start, read_all, unique
from tests.wsgi_apps import behind_middleware, served


def item(request, item_id: int):
    who = request.environ[ENVIRON_KEY]
    return JsonResponse({"id": item_id, "org": who.org_id, "key": who.api_key_id})


def legacy(request, code: str):
    return JsonResponse({"code": code})


urlpatterns = [
    path("shop/", include([path("items/<int:item_id>", item)])),
    re_path(r"^legacy/(?P<code>[0-9]+)$", legacy),
]


def django_app():
    from django.conf import settings

    if not settings.configured:
        settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["127.0.0.1"], DEBUG=False, USE_TZ=True,
                           SECRET_KEY="tests-only-not-a-secret", MIDDLEWARE=[], INSTALLED_APPS=[])
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def test_django_routes_become_templates():
    django_app()
    route = django_route()
    assert route({"PATH_INFO": "/shop/items/7"}) == "/shop/items/{item_id}"  # the include's prefix joined
    assert route({"PATH_INFO": "/legacy/7"}) is None  # a regular expression is no template: the path stands in
    assert route({"PATH_INFO": "/nowhere"}) is None


@pytest.mark.stack
def test_django_project_is_limited_and_each_request_published_under_its_route(live_stack, redis_client, port_base):
    org = unique("org")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "FREE")
    presented, record = new_key(redis_client, org)
    settings = live_stack.model_copy(update={"key_hash_secrets": SECRETS, "gateway_timeout_ms": 5000})
    app, emitter = behind_middleware(django_app(), settings, django_route(), settings.state_dir / f"spool-{org}")
    try:
        with served(app, port_base + 152) as url:
            minute_start(need_s=20)
            with httpx.Client(base_url=url, timeout=10) as client:
                anonymous = client.get("/shop/items/1")
                auth = {"Authorization": f"Bearer {presented}"}
                responses = [client.get(f"/shop/items/{i}", headers=auth) for i in range(11)]
                legacy_one = client.get("/legacy/12345", headers=auth)
        emitter.flush(30)
    finally:
        emitter.close()
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "missing_key"
    assert [r.status_code for r in responses] == [200] * 10 + [429]
    assert responses[4].json() == {"id": 4, "org": org, "key": record.key_id}  # the verified identity, in Django
    assert legacy_one.status_code == 429 and emitter.failed == 0

    records = asyncio.run(read_all(live_stack, EVENTS_TOPIC))
    events = [ev._asdict() for r in records if r.key == org.encode() for ev in decode_record(r.value)]
    assert sorted(e["event_id"] for e in events) == sorted(
        r.headers["X-Quotaflow-Event-Id"] for r in [*responses, legacy_one])  # each request once
    by_endpoint = sorted((e["endpoint"], e["status"]) for e in events)
    assert by_endpoint == sorted([("/shop/items/{item_id}", 200)] * 10 + [("/shop/items/{item_id}", 429),
                                                                           ("/legacy/{id}", 429)])
