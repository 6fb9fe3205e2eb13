"""Shared by the benchmarks: a stack of their own, and figures printed as `name: value unit`.

Run a benchmark as `.venv/bin/python bench/NAME.py`; it brings up what it needs on
ports QUOTAFLOW_BENCH_PORT_BASE+N (default 27000: below the kernel's ephemeral ports, so a
client polling a port not listening yet cannot connect to itself), state in .quotaflow-bench-BASE/.
Machines are shared and noisy: every benchmark measures its baseline in the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

from quotaflow.deploy import stack

ROOT = Path(__file__).resolve().parent.parent
BASE = int(os.environ.get("QUOTAFLOW_BENCH_PORT_BASE", "27000"))

os.environ.update(stack.isolated_env(BASE, ROOT / f".quotaflow-bench-{BASE}",
                                     Path(os.environ.get("QUOTAFLOW_CACHE_DIR", ROOT / ".quotaflow" / "cache"))))

from quotaflow.core.settings import Settings, get_settings  # noqa: E402  (after the environment is set)


def up() -> Settings:
    """The stack, from an empty state dir: every run starts alike."""
    import shutil

    settings = get_settings()
    stack.down(settings)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    stack.up(settings)
    return settings


def report(name: str, value: float, unit: str) -> None:
    print(f"{name}: {value:.3f} {unit}", flush=True)
