"""Prometheus metrics endpoint of a long-running process, and reading one back."""

from __future__ import annotations

import urllib.request

from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families


def serve(port: int) -> None:
    """Expose /metrics on 127.0.0.1:port (0: don't)."""
    if port:
        start_http_server(port, addr="127.0.0.1")


def scrape(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """Sum of each sample name over its labels, e.g. {"quotaflow_sink_rows_inserted_total": 120.0}.
    Labelled samples are also given as name{label="value"}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
    return out
