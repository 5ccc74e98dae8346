#!/usr/bin/env bash
# Build the abi3 wheel, install it into a fresh venv with NumPy only (no torch), and run a tiny
# NumPy smoke test of both projections through saerecover.linalg.
#
#   scripts/wheel_smoke.sh          # plain `maturin build --release` (tagged for this glibc)
#   scripts/wheel_smoke.sh --zig    # link with zig (pip package `ziglang`): manylinux2014
#
# The wheel's declared dependencies (torch, transformers, ...) are not installed (--no-deps):
# the smoke test needs numpy and the extension only.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python="${PYTHON:-python3}"

cd "$root"
maturin build --release --out "$work/dist" "$@"
wheel="$(ls "$work"/dist/saerecover-*.whl)"
echo "built $(basename "$wheel")"

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$wheel"

cd "$work"  # away from the source tree, so that the installed wheel is what gets imported
"$work/venv/bin/python" - <<'PY'
import numpy as np

import saerecover._core as core
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

assert "site-packages" in core.__file__, core.__file__
rng = np.random.default_rng(0)

A = rng.standard_normal((64, 8))
P = EncoderNullProjector(A)
for dtype, bar in ((np.float32, 1e-5), (np.float64, 1e-12)):
    X = rng.standard_normal((10, 64)).astype(dtype)
    Y = P.apply(X)
    assert Y.dtype == dtype and Y.shape == X.shape
    ratio = np.abs(Y.astype(np.float64) @ A).max() / (np.linalg.norm(A, 2) * np.abs(X).max())
    assert ratio < bar, ratio

J = rng.standard_normal((5, 64))
G = rng.standard_normal(64)
Y = jacobian_null_project(J, G)
assert Y.shape == G.shape and np.abs(J @ Y).max() < 1e-12

try:
    P.apply(np.zeros((2, 63)))
except ValueError as e:
    assert "built for d=64" in str(e)
else:
    raise AssertionError("no error for a wrong shape")
print(f"wheel smoke test passed: {core.__file__}, rank {P.rank}")
PY
