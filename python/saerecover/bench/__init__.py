"""Benchmarks for saerecover's hot paths, measured in one run against their alternatives.

`projection` times the two null-space projections of the Rust core (`saerecover.linalg`) against
NumPy, torch and the paper's per-row ridge solve; `recovery` times a recovery step per projection
mode at real model shapes (random weights, no download); see docs/benchmarks.md.
"""

from __future__ import annotations

__all__ = ["projection", "recovery"]
