"""Event documents shared by the schema and decoder tests."""

from __future__ import annotations


def good() -> dict:
    """A valid RequestEvent v1 document, every field set (a new dict on each call)."""
    return {
        "schema_version": 1,
        "event_id": "123e4567-e89b-42d3-a456-426614174000",
        "ts_ms": 1_795_000_000_123,
        "org_id": "acme",
        "api_key_id": "acme-web",
        "service": "checkout",
        "endpoint": "/v1/orders/{order_id}/items",
        "method": "POST",
        "status": 201,
        "latency_ms": 12.75,
        "request_bytes": 300,
        "response_bytes": 1200,
        "client_ip": "2001:db8::1",
        "user_agent": "okhttp/4.12.0",
    }
