"""The dashboard's third-party browser code, built into the package: Chart.js, pinned by
version and SHA-256 in vendor.sha256 (the tarball as the npm registry serves it, and the
one file taken from it).

Run at build time by setup.py (stdlib only: the build runs before the package's own
dependencies are installed), or by hand: ``python analytics/dashboard/vendor.py``. The
tarball is fetched with npm's own client (``npm pack``), which reads the registry the
machine is configured for; its digest is checked before anything is unpacked, and the
file unpacked is checked again. A mismatch or a missing npm stops the build with a
message saying so.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "vendor.sha256"
TARGET_DIR = HERE / "static" / "vendor"


class VendorError(RuntimeError):
    pass


def pins() -> tuple[str, str, dict[str, str]]:
    """(package spec, tarball name, {file name: sha256}) from vendor.sha256."""
    digests: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            digests[name] = digest
    tarball = next(name for name in digests if name.endswith(".tgz"))
    package, _, version = tarball.removesuffix(".tgz").rpartition("-")
    return f"{package}@{version}", tarball, digests


def target(member: str) -> Path:
    return TARGET_DIR / Path(member).name


def is_current() -> bool:
    _, tarball, digests = pins()
    return all(target(m).is_file() and hashlib.sha256(target(m).read_bytes()).hexdigest() == d
               for m, d in digests.items() if m != tarball)


def fetch() -> list[Path]:
    """Fetch, check and unpack the pinned files (a no-op when they are already there)."""
    spec, tarball, digests = pins()
    members = {m: d for m, d in digests.items() if m != tarball}
    if is_current():
        return [target(m) for m in members]
    npm = shutil.which("npm")
    if npm is None:
        raise VendorError(f"building the dashboard needs npm to fetch {spec} (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", "--silent", "--pack-destination", tmp, spec],
                              capture_output=True, text=True, timeout=300)
        path = Path(tmp) / tarball
        if done.returncode != 0 or not path.is_file():
            last = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise VendorError(f"npm pack {spec} failed:\n{last}")
        data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digests[tarball]:
        raise VendorError(f"checksum mismatch for {tarball}: expected sha256 {digests[tarball]}, got {actual}")
    TARGET_DIR.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, digest in members.items():
            f = tar.extractfile(member)
            if f is None:
                raise VendorError(f"{tarball} has no {member}")
            body = f.read()
            if hashlib.sha256(body).hexdigest() != digest:
                raise VendorError(f"checksum mismatch for {member} in {tarball}")
            target(member).write_bytes(body)
            out.append(target(member))
    return out


if __name__ == "__main__":
    try:
        for p in fetch():
            print(p)
    except VendorError as exc:
        sys.exit(f"dashboard vendor: {exc}")
