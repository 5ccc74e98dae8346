"""Benchmarks for saerecover's hot paths, measured in one run against their alternatives.

`projection` times the two null-space projections of the Rust core (`saerecover.linalg`) against
NumPy, torch and the paper's per-row ridge solve; see docs/benchmarks.md.
"""

from __future__ import annotations

__all__ = ["projection"]
