"""`quotaflow demo`, the README's first command, on the test stack (run once per session
by the demo_run fixture, tests/conftest.py)."""

import re

import pytest

from quotaflow.deploy.demo_traffic import INVALID_EVERY

pytestmark = pytest.mark.stack


def test_demo_runs_end_to_end_and_accounts_for_every_event(demo_run):
    result = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout[-3000:]  # shown with any failure below
    live = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(live) >= 10, output  # a live summary every 2 s
    final = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: produced=(\d+) processed=(\d+) stored=(\d+) denied_keys=(\d+) dead_letters=(\d+) lost=(\d+)",
                     final)
    assert m, output
    produced, processed, stored, denied, dead, lost = map(int, m.groups())
    assert produced > 300, output
    assert processed == produced and stored == produced and lost == 0, output
    assert dead == produced // INVALID_EVERY, output
    assert denied >= 1, output
