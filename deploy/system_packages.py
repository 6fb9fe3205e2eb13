"""Debian packages the stack needs (redis-server, maven), installed when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

from quotaflow.core.errors import OperatorError

SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin"


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=SEARCH_PATH)


def ensure_command(cmd: str, package: str) -> str:
    """Path of ``cmd``, installing Debian's ``package`` first if it is missing."""
    path = which(cmd)
    if path:
        return path
    install([package])
    path = which(cmd)
    if not path:
        raise OperatorError(f"installed {package} but {cmd} is still not on PATH")
    return path


def install(packages: list[str]) -> None:
    if not which("apt-get"):
        raise OperatorError(f"{' '.join(packages)} is missing and this system has no apt-get; install it by hand")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not which("sudo"):
            raise OperatorError(f"{' '.join(packages)} is missing; run: sudo apt-get install -y {' '.join(packages)}")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = prefix + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    print(f"installing {' '.join(packages)} (Debian packages)...", flush=True)
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return
    # A fresh machine may have no package lists yet.
    subprocess.run(prefix + ["apt-get", "update", "-q"], env=env, capture_output=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise OperatorError(f"could not install {' '.join(packages)} with apt-get:\n{last}")
