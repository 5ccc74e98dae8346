#!/usr/bin/env bash
# The release checks on this Linux machine (part of scripts/test.sh):
#   1. build the abi3 wheel for manylinux2014 (zig as the linker, glibc 2.17) and the sdist;
#   2. the wheel and sdist carry the version in Cargo.toml, and CHANGELOG.md has its section;
#   3. auditwheel show: the platform tag auditwheel derives is one the wheel's name claims;
#   4. abi3audit --strict: no symbol outside the stable ABI of Python 3.10;
#   5. twine check --strict on wheel and sdist: the metadata and README render;
#   6. the toy world's assets and the report templates are all inside the wheel (and the sdist); the sizes;
#   7. scripts/fresh_install.sh --demo: the wheel in a fresh venv of the lowest supported Python
#      found here (3.10; else this Python), no cargo on PATH, `saerecover demo` to the end; and,
#      with SAERECOVER_FRESH_SUITE=1 and that Python not this one, the suite on the wheel.
#
#   scripts/check_wheel.sh [--out DIR]     # keep the wheel and sdist in DIR
#
# Needs the `release` extra (maturin, ziglang, auditwheel, abi3audit, twine, uv). PYTHON_FRESH
# names the interpreter for step 7.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dist="$work/dist"
if [ "${1:-}" = "--out" ]; then
  dist="$(mkdir -p "$2" && cd "$2" && pwd)"
  rm -f "$dist"/saerecover-*
fi
start=$SECONDS
step() { printf '\n== %s  [%d s]\n' "$1" $((SECONDS - start)); }
cd "$root"

step "build: maturin build --release --compatibility manylinux2014 --zig; maturin sdist"
maturin build --release --compatibility manylinux2014 --zig --out "$dist"
maturin sdist --out "$dist"
wheel="$(ls "$dist"/saerecover-*.whl)"
sdist="$(ls "$dist"/saerecover-*.tar.gz)"
echo "wheel: $(basename "$wheel")"
echo "sdist: $(basename "$sdist")"

step "version: Cargo.toml, wheel, sdist, CHANGELOG.md"
python scripts/release_version.py --dist "$wheel" --dist "$sdist" --changelog CHANGELOG.md

step "auditwheel show"
auditwheel show "$wheel" | tee "$work/auditwheel.txt"
tag="$(tr -d '\n' < "$work/auditwheel.txt" | grep -o 'following platform tag: *"[^"]*"' | cut -d'"' -f2)"
claimed="$(basename "$wheel" .whl | cut -d- -f5)"
case ".$claimed." in
  *".$tag."*) echo "auditwheel: $tag, which the wheel claims ($claimed)" ;;
  *) echo "check_wheel: auditwheel says '$tag', the wheel claims '$claimed'" >&2; exit 1 ;;
esac

step "abi3audit --strict"
abi3audit --strict --summary "$wheel"

step "twine check --strict"
twine check --strict "$wheel" "$sdist"

step "contents: the toy world's assets and the report templates, sizes"
python - "$wheel" "$sdist" <<'PY'
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, sdist = map(Path, sys.argv[1:])
assets = Path("python/saerecover/toy/assets")
want = sorted(p.relative_to("python").as_posix() for p in assets.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts)
assert want, f"no assets under {assets}"
templates = Path("python/saerecover/report/templates")  # report.html is rendered from these
want_templates = sorted(p.relative_to("python").as_posix() for p in templates.rglob("*") if p.is_file())
assert want_templates, f"no templates under {templates}"
with zipfile.ZipFile(wheel) as z:
    infos = z.infolist()
    names = {i.filename for i in infos}
with tarfile.open(sdist) as t:
    sdist_names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
missing = [n for n in want + want_templates if n not in names]
missing_sdist = [n for n in want + want_templates if f"python/{n}" not in sdist_names]
assert not missing, f"the wheel lacks {missing}"
assert not missing_sdist, f"the sdist lacks {missing_sdist}"
size = sum(i.file_size for i in infos if i.filename in want)
print(f"toy world assets: all {len(want)} files in the wheel and the sdist ({size / 2**20:.2f} MiB); "
      f"report templates: all {len(want_templates)}")
unpacked = sum(i.file_size for i in infos)
core = max((i for i in infos if "/_core." in i.filename), key=lambda i: i.file_size)
mib = 2**20
print(f"wheel {wheel.name}: {wheel.stat().st_size / mib:.2f} MiB "
      f"({unpacked / mib:.2f} MiB unpacked, {core.filename} {core.file_size / mib:.2f} MiB)")
print(f"sdist {sdist.name}: {sdist.stat().st_size / mib:.2f} MiB")
PY

step "fresh venv, no Rust toolchain: saerecover demo"
fresh="${PYTHON_FRESH:-}"
if [ -z "$fresh" ]; then
  fresh=python3
  for c in python3.10 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.10*/bin/python3.10; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      fresh="$c"
      break
    fi
  done
fi
# SAERECOVER_FRESH_SUITE=1: the suite runs there too, when that Python is not this one.
suite=()
minor='import sys; print(sys.version_info[:2])'
if [ "${SAERECOVER_FRESH_SUITE:-}" = 1 ] && [ "$("$fresh" -c "$minor")" != "$(python -c "$minor")" ]; then
  suite=(--suite -q)
fi
PYTHON="$fresh" bash scripts/fresh_install.sh "$dist" --demo "${suite[@]}"

step "wheel checks passed"
