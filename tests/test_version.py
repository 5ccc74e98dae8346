"""One version everywhere: Cargo.toml (the source, which maturin writes into the metadata),
the installed metadata, ``saerecover.__version__``, ``saerecover --version`` and CHANGELOG.md."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.version import Version

import saerecover

ROOT = Path(__file__).resolve().parents[1]


def cargo_version() -> Version:
    """``version`` of Cargo.toml's [package] table (SemVer; Version reads it as PEP 440)."""
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", (ROOT / "Cargo.toml").read_text(), re.M | re.S)
    return Version(re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M).group(1))


@pytest.fixture(scope="module")
def installed() -> str:
    try:
        return version("saerecover")
    except PackageNotFoundError:
        pytest.skip("saerecover is not installed (running from the source tree)")


def test_installed_metadata_is_the_cargo_version(installed):
    assert Version(installed) == cargo_version(), "reinstall after changing Cargo.toml's version"


def test_dunder_version_is_the_installed_metadata(installed):
    assert saerecover.__version__ == installed


def test_cli_version_is_the_installed_metadata(installed):
    script = Path(sys.executable).with_name("saerecover.exe" if sys.platform == "win32" else "saerecover")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "saerecover.cli"]
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"saerecover {installed}"


def test_changelog_has_a_section_for_the_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(str(cargo_version()))}\]", text, re.M)
