"""Smoke test of an installed saerecover wheel with NumPy alone (no torch): both projections
through saerecover.linalg, and the installed version. Run it from outside the source tree, so
that the wheel in site-packages is what gets imported:

    cd /tmp && python /path/to/scripts/wheel_smoke.py
"""

from importlib.metadata import version

import numpy as np

import saerecover
import saerecover._core as core
from saerecover.linalg import EncoderNullProjector, jacobian_null_project

assert "site-packages" in core.__file__, f"imported from the source tree: {core.__file__}"
assert saerecover.__version__ == version("saerecover"), (saerecover.__version__, version("saerecover"))
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
print(f"wheel smoke test passed: saerecover {saerecover.__version__}, {core.__file__}, rank {P.rank}")
