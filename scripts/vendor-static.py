#!/usr/bin/env python3
"""Refresh the vendored browser assets under static/vendor/ from the npm registry, reproducibly.

Each package is pinned below by version and by the registry's sha512 integrity of its tarball. The script
fetches the tarball with ``npm pack`` (the npm client, from the configured registry: no CDN), refuses it
unless its sha512 matches the pin, and copies the listed files with the package's licence and a VERSION
file saying where they came from. Running it again on the same pins writes identical files.

    python3 scripts/vendor-static.py           # fetch, check, write static/vendor/
    python3 scripts/vendor-static.py --check   # fetch, check, and fail if static/vendor/ differs

To move to another version: ``npm view htmx.org@<version> dist.integrity``, put the version and that
integrity below, run the script, commit static/vendor/ (docs/operations.md, "Vendored browser assets").
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "static" / "vendor"


@dataclass(frozen=True)
class Pin:
    package: str  # npm package name
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    directory: str  # under static/vendor/
    files: tuple[tuple[str, str], ...]  # (path in the tarball under package/, file name written)
    license: str  # SPDX id, stated in VERSION

    @property
    def tarball(self) -> str:
        name = self.package.rsplit("/", 1)[-1]
        return f"https://registry.npmjs.org/{self.package}/-/{name}-{self.version}.tgz"


PINS = (
    Pin(
        package="htmx.org",
        version="2.0.11",
        integrity="sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
        directory="htmx",
        files=(("dist/htmx.min.js", "htmx.min.js"), ("LICENSE", "LICENSE")),
        license="0BSD",
    ),
)


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(pin: Pin, workdir: Path) -> bytes:
    """The package's tarball, fetched by npm from the registry, checked against the pinned integrity."""
    spec = f"{pin.package}@{pin.version}"
    subprocess.run(["npm", "pack", spec, "--pack-destination", str(workdir), "--silent"],
                   check=True, cwd=workdir, stdout=subprocess.DEVNULL)
    tarballs = list(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise SystemExit(f"npm pack {spec}: expected one tarball, found {tarballs}")
    data = tarballs[0].read_bytes()
    tarballs[0].unlink()
    actual = integrity_of(data)
    if actual != pin.integrity:
        raise SystemExit(f"{spec}: the registry's tarball has integrity {actual}, the pin says {pin.integrity}")
    return data


def version_note(pin: Pin) -> str:
    return (
        f"{pin.package} {pin.version} ({pin.license}, see LICENSE), vendored by scripts/vendor-static.py\n"
        f"source: {pin.tarball}\n"
        f"integrity: {pin.integrity}\n"
        f"files: {', '.join(f'package/{inside} -> {name}' for inside, name in pin.files)}\n"
    )


def contents(pin: Pin, tarball: bytes, workdir: Path) -> dict[str, bytes]:
    """File name -> bytes of what belongs in static/vendor/<directory>/."""
    path = workdir / "package.tgz"
    path.write_bytes(tarball)
    out: dict[str, bytes] = {"VERSION": version_note(pin).encode()}
    with tarfile.open(path, "r:gz") as archive:
        for inside, name in pin.files:
            member = archive.extractfile(f"package/{inside}")
            if member is None:
                raise SystemExit(f"{pin.package}@{pin.version}: package/{inside} is not a file")
            out[name] = member.read()
    path.unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; fail if static/vendor/ differs")
    args = parser.parse_args()
    if shutil.which("npm") is None:
        raise SystemExit("npm is not on PATH (Debian: apt-get install npm)")
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="steward-vendor-") as tmp:
        for pin in PINS:
            wanted = contents(pin, fetch(pin, Path(tmp)), Path(tmp))
            target = VENDOR / pin.directory
            present = {p.name for p in target.iterdir()} if target.is_dir() else set()
            if args.check:
                stale += [f"{pin.directory}/{name}" for name, data in wanted.items()
                          if not (target / name).is_file() or (target / name).read_bytes() != data]
                stale += [f"{pin.directory}/{name} (not from the package)" for name in present - wanted.keys()]
                continue
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for name, data in wanted.items():
                (target / name).write_bytes(data)
            print(f"static/vendor/{pin.directory}: {pin.package} {pin.version}")
    if stale:
        print("static/vendor/ differs from the pinned packages:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
