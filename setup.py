"""Build hook: the dashboard's pinned browser code (Chart.js) is fetched and checked before
the package's files are collected (analytics/dashboard/vendor.py); everything else is in
pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithVendor(build_py):
    def run(self):
        vendor = runpy.run_path(str(Path(__file__).parent / "analytics" / "dashboard" / "vendor.py"))
        vendor["fetch"]()
        super().run()


setup(cmdclass={"build_py": BuildWithVendor})
