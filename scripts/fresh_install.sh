#!/usr/bin/env bash
# Install the saerecover wheel from DIST into a fresh venv, with no Rust toolchain on PATH and
# saerecover only ever from a wheel, and try it as a user would:
#
#   scripts/fresh_install.sh DIST            # NumPy alone (--no-deps): the Rust core through
#                                            # saerecover.linalg (scripts/wheel_smoke.py)
#   scripts/fresh_install.sh DIST --demo     # then the declared dependencies (torch, ...):
#                                            # `saerecover --version`, `saerecover demo`
#   scripts/fresh_install.sh DIST --demo --suite [PYTEST ARGS]
#                                            # then the dev extra (pytest, ...) and the test
#                                            # suite, on the installed wheel
#
# PYTHON names the venv's interpreter (default python3). pip (or uv, when it is on PATH: parallel
# downloads, and a cache that links files instead of copying them) picks from DIST the wheel
# that fits this platform and interpreter. A dependency that would need Rust to build fails for
# want of cargo; a pure-Python sdist still installs. Used by scripts/check_wheel.sh and by the
# release workflow on every platform.
set -euo pipefail

dist="$(cd "${1:?usage: fresh_install.sh DIST [--demo] [--suite [PYTEST ARGS]]}" && pwd)"
shift
demo="" suite=""
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1; shift ;;
    --suite) suite=1; shift; break ;;
    *) echo "fresh_install: unknown option $1" >&2; exit 2 ;;
  esac
done
root="$(cd "$(dirname "$0")/.." && pwd)"
base="$(command -v "${PYTHON:-python3}")"  # found before PATH loses the Rust folders
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# PATH without any folder that holds cargo or rustc.
clean=""
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
  for tool in cargo rustc cargo.exe rustc.exe; do
    [ -e "$d/$tool" ] && continue 2
  done
  clean="${clean:+$clean:}$d"
done
export PATH="$clean"
unset CARGO_HOME RUSTUP_HOME RUSTUP_TOOLCHAIN
if command -v cargo || command -v rustc; then
  echo "fresh_install: a Rust toolchain is still on PATH" >&2
  exit 1
fi
echo "no cargo or rustc on PATH"

"$base" -m venv "$work/venv"
bin="$work/venv/bin"
[ -d "$bin" ] || bin="$work/venv/Scripts"  # Windows
if command -v uv >/dev/null; then
  installer="uv $(uv --version | cut -d' ' -f2)"
  venv_install() { uv pip install --quiet --python "$bin/python" "$@"; }
else
  installer="pip"
  venv_install() { "$bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
fi
export PATH="$bin:$PATH"
echo "fresh venv: Python $(python -c 'import platform; print(platform.python_version())'), installs with $installer"

venv_install numpy
venv_install --no-deps --no-index --find-links "$dist" --only-binary saerecover saerecover
version="$(python -c 'from importlib.metadata import version; print(version("saerecover"))')"
echo "installed saerecover $version from $dist"

cd "$work"  # away from the source tree, so that the installed wheel is what gets imported
python "$root/scripts/wheel_smoke.py"

if [ -n "$demo" ]; then
  t0="$(date +%s)"
  venv_install --find-links "$dist" --only-binary saerecover "saerecover==$version"  # its dependencies
  echo "dependencies installed in $(( $(date +%s) - t0 )) s"
  out="$(saerecover --version)"
  if [ "$out" != "saerecover $version" ]; then
    echo "fresh_install: saerecover --version says '$out', the metadata says $version" >&2
    exit 1
  fi
  echo "$out"
  t0="$(date +%s)"
  saerecover demo --quiet --out "$work/demo"
  for f in summary.json report.md records.jsonl; do
    [ -s "$work/demo/$f" ] || { echo "fresh_install: the demo wrote no $f" >&2; exit 1; }
  done
  echo "saerecover demo ran to the end in $(( $(date +%s) - t0 )) s (process wall time, imports included)"
fi

if [ -n "$suite" ]; then
  venv_install --find-links "$dist" --only-binary saerecover "saerecover[dev]==$version"
  echo "the test suite on the installed wheel, Python $(python -c 'import platform; print(platform.python_version())')"
  python -m pytest -p no:cacheprovider --rootdir "$root" "$root/tests" "$@"
fi
