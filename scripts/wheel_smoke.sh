#!/usr/bin/env bash
# Build the abi3 wheel, install it into a fresh venv with NumPy only (no torch) and no Rust
# toolchain on PATH, and run a tiny NumPy smoke test of both projections through
# saerecover.linalg (scripts/fresh_install.sh, scripts/wheel_smoke.py).
#
#   scripts/wheel_smoke.sh          # plain `maturin build --release` (tagged for this glibc)
#   scripts/wheel_smoke.sh --zig    # link with zig (pip package `ziglang`): manylinux2014
#
# The wheel's declared dependencies (torch, transformers, ...) are not installed (--no-deps):
# the smoke test needs numpy and the extension only. PYTHON names the venv's interpreter.
# scripts/check_wheel.sh runs the full release checks.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$root"
maturin build --release --out "$work/dist" "$@"
echo "built $(basename "$(ls "$work"/dist/saerecover-*.whl)")"
bash "$root/scripts/fresh_install.sh" "$work/dist"
