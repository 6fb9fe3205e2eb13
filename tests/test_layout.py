"""The package as users install it: one top-level import package, layers that point one
way (import-linter contracts in pyproject.toml), the data files the code reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel built from the repository, a directory it is installed into)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = out.glob("quotaflow-*.whl")
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    return wheel, site


def test_the_wheel_holds_one_import_package_and_its_data(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"quotaflow", f"{wheel.name.split('-py')[0]}.dist-info"}
    stages = {n.split("/")[1] for n in names if n.count("/") >= 2 and n.startswith("quotaflow/")}
    assert {"core", "schemas", "collector", "processors", "sinks", "gateway", "analytics", "deploy"} <= stages
    for data in ("quotaflow/schemas/request_event.v1.schema.json", "quotaflow/schemas/dedup.lua",
                 "quotaflow/schemas/clickhouse/0001_requests.sql", "quotaflow/gateway/check.lua",
                 "quotaflow/processors/write.lua", "quotaflow/deploy/kafka/pom.xml",
                 "quotaflow/deploy/nginx/quotaflow.conf"):
        assert data in names, data


def test_the_layers_point_one_way(installed, tmp_path):
    """import-linter reads the installed tree (an editable install maps the stages' folders
    into the package, which it cannot walk), from a directory with no package of its own."""
    _, site = installed
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_the_installed_package_runs_from_its_own_files(installed, tmp_path):
    """The installed copy, not the repository's folders, answers `quotaflow --help` and
    finds its data files."""
    _, site = installed
    code = ("import quotaflow.schemas.clickhouse.migrate as m, quotaflow.gateway.limiter as g; "
            "print(m.__file__); print(len(m.available()), len(g.SCRIPT) > 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    where, found = done.stdout.splitlines()
    migrations = len(list((ROOT / "schemas" / "clickhouse").glob("*.sql")))
    assert where.startswith(str(site)) and found.split() == [str(migrations), "True"]
