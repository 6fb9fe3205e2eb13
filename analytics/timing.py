"""Server-Timing headers: where an answer's time went on the server (waiting for a query
slot, the query, Redis, Kafka), for the browser's Resource Timing; bench/dashboard.py reads
them to break a page load down by panel and phase."""

from __future__ import annotations


def server_timing(**seconds: float) -> str:
    """A Server-Timing header value: each named phase's duration in ms."""
    return ", ".join(f"{name};dur={s * 1000:.1f}" for name, s in seconds.items())
