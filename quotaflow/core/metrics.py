"""Prometheus metrics, served one way: each process's one registry (prometheus_client's
default, where every Counter and Gauge of the package registers) in the text exposition
format at /metrics.

- The HTTP apps that exist mount ``asgi_app`` at /metrics: the gateway's check server
  (gateway/server.py) and the query API (analytics/app.py). A service that runs the
  gateway middleware or the emitter mounts it in its own app to serve their counters.
- The workers that have no HTTP app, the processor and the sink, ``serve`` it on a port of
  their own (QUOTAFLOW_PROCESSOR_METRICS_PORT, QUOTAFLOW_SINK_METRICS_PORT), from a thread:
  a scrape is answered even while the worker's loop is busy with a batch.

``scrape`` reads one back (the stack's readiness checks, tests, benchmarks).
"""

from __future__ import annotations

import urllib.request

from prometheus_client import make_asgi_app, start_http_server
from prometheus_client.parser import text_string_to_metric_families

_ASGI = make_asgi_app()
# What a scraper sends: the format it accepts and the compression. Anything else is left
# out, as are the query string (prometheus_client's name[] filter) and any header value
# that is not ASCII: prometheus_client decodes them as UTF-8 and raises otherwise.
_NEGOTIATED = (b"accept", b"accept-encoding")


class _MetricsApp:
    """/metrics as an ASGI app (an instance, so that starlette.routing.Route takes it as an
    app, not as a request handler)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"method not allowed; GET /metrics\n"})
            return
        headers = [(name, value) for name, value in scope.get("headers", ())
                   if name.lower() in _NEGOTIATED and value.isascii()]
        await _ASGI({**scope, "query_string": b"", "headers": headers}, receive, send)


# Mounted as Route("/metrics", metrics.asgi_app).
asgi_app = _MetricsApp()


def serve(port: int) -> None:
    """Expose /metrics on 127.0.0.1:port (0: don't)."""
    if port:
        start_http_server(port, addr="127.0.0.1")


def parse(text: str) -> dict[str, float]:
    """Sum of each sample name over its labels, e.g. {"quotaflow_sink_rows_inserted_total": 120.0}.
    Labelled samples are also given as name{label="value"}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def scrape(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """The samples served at http://127.0.0.1:port/metrics, as ``parse`` gives them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        return parse(resp.read().decode())
