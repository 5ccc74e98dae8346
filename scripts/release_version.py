"""The release version, from its one source: `version` in Cargo.toml's [package] table (maturin
writes it into the wheel's metadata, which `saerecover.__version__` and `saerecover --version`
read). Prints it in Python's form (PEP 440: 0.2.0-rc.1 becomes 0.2.0rc1) and checks that
the other places agree:

    python scripts/release_version.py                        # print it
    python scripts/release_version.py --tag v0.1.0           # the git tag names it
    python scripts/release_version.py --dist saerecover-0.1.0-cp310-abi3-....whl
    python scripts/release_version.py --changelog CHANGELOG.md

--dist (repeatable) checks a wheel's name and METADATA, or an sdist's name. --changelog checks
for a `## [VERSION]` section; with --tag the section must also carry the release date.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRE = {"alpha": "a", "beta": "b", "rc": "rc"}


def cargo_version(path: Path = ROOT / "Cargo.toml") -> str:
    """`version` of the [package] table, as written there (SemVer)."""
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", path.read_text(), re.M | re.S)
    found = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not found:
        raise SystemExit(f"no version in the [package] table of {path}")
    return found.group(1)


def python_version(semver: str) -> str:
    """The PEP 440 form of a SemVer version, as maturin writes it into the metadata."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:-(alpha|beta|rc)\.?(\d+))?", semver)
    if not m:
        raise SystemExit(f"Cargo.toml version {semver!r}: use X.Y.Z or X.Y.Z-(alpha|beta|rc).N")
    release, pre, n = m.groups()
    return release + (f"{PRE[pre]}{n}" if pre else "")


def dist_version(path: Path) -> str:
    """The version in a wheel's or an sdist's file name (and, for a wheel, its METADATA)."""
    name = path.name
    if name.endswith(".whl"):
        version = name.split("-")[1]
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            found = re.search(r"^Version: (.+)$", z.read(meta).decode(), re.M)
        if not found or found.group(1).strip() != version:
            raise SystemExit(f"{name}: METADATA has version {found and found.group(1)!r}")
        return version
    if name.endswith(".tar.gz"):
        return name[: -len(".tar.gz")].rsplit("-", 1)[1]
    raise SystemExit(f"{name}: neither a wheel nor an sdist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", help="a git tag such as v0.1.0 (refs/tags/ is dropped)")
    parser.add_argument("--dist", action="append", default=[], type=Path, help="a wheel or sdist")
    parser.add_argument("--changelog", type=Path, help="CHANGELOG.md")
    args = parser.parse_args(argv)

    semver = cargo_version()
    version = python_version(semver)
    problems = []
    if args.tag is not None:
        tag = args.tag.removeprefix("refs/tags/")
        if tag not in (f"v{semver}", f"v{version}"):
            problems.append(f"tag {tag} does not name the version in Cargo.toml (v{semver})")
    for path in args.dist:
        if dist_version(path) != version:
            problems.append(f"{path.name} carries {dist_version(path)}, Cargo.toml says {version}")
    if args.changelog is not None:
        heading = re.search(rf"^## \[{re.escape(version)}\](.*)$", args.changelog.read_text(), re.M)
        if not heading:
            problems.append(f"{args.changelog} has no '## [{version}]' section")
        elif args.tag is not None and not re.search(r"\d{4}-\d{2}-\d{2}", heading.group(1)):
            problems.append(f"{args.changelog}: the [{version}] section has no release date")
    for problem in problems:
        print(f"release_version: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
