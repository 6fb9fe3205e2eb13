"""`quotaflow demo`, the README's first command, on the test stack."""

import os
import re
import subprocess
import sys

import pytest

from quotaflow.deploy.demo_traffic import INVALID_EVERY

pytestmark = pytest.mark.stack


def test_demo_runs_end_to_end_and_accounts_for_every_event(live_stack):
    # 25 s: even split across a minute boundary, the FREE key at 60/min exceeds 10/min in one window.
    result = subprocess.run([sys.executable, "-m", "quotaflow", "demo", "--seconds", "25"], capture_output=True,
                            text=True, timeout=300, env=os.environ.copy())
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
