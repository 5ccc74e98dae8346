"""Projection modes: how each optimisation step is kept off the defended features.

- ``none``: unconstrained (the paper's baseline).
- ``encoder``: C1, delta in the null space of A_S^T at every optimized row of every clamped
  delta site (``saerecover.linalg.EncoderNullProjector``, the Rust core on CPU).
- ``jacobian``: every step orthogonal to the row space of the exact Jacobian J of Phi, the
  stacked defended features of every clamped site at or after the delta sites, solved by
  ``saerecover.linalg.jacobian_null_project``.
- ``sketch``: the reference's approximation: a few random probes of Phi's row space plus an
  optional drift probe, Gram-Schmidt, projection of the gradient only.

Each mode is a :class:`ProjectionMode` in its own module; :data:`PROJECTIONS` registers it
under its name, so a new mode is one module plus one entry there.
"""

from saerecover.core.projection.base import (
    Deltas,
    ProjectionMode,
    StepContext,
    StepState,
    flatten_example,
    rescale_to_budget,
    unflatten_example,
)
from saerecover.core.projection.encoder import (
    MIN_ENCODER_NULL_FRACTION,
    EncoderNull,
    EncoderNullMode,
    encoder_null_space,
    encoder_null_warnings,
)
from saerecover.core.projection.jacobian import (
    ExactJacobian,
    batched_vjp_jacobian,
    example_jacobians,
    packed_jacobians,
)
from saerecover.core.projection.none import Unconstrained
from saerecover.core.projection.phi import defended_feature_parts, defended_features
from saerecover.core.projection.sketch import Sketch, project_out_basis, sketch_basis

#: The projection modes by name (the ``projection=`` / ``--modes`` words).
PROJECTIONS: dict[str, type[ProjectionMode]] = {
    "none": Unconstrained,
    "encoder": EncoderNullMode,
    "jacobian": ExactJacobian,
    "sketch": Sketch,
}

__all__ = [
    "MIN_ENCODER_NULL_FRACTION",
    "PROJECTIONS",
    "Deltas",
    "EncoderNull",
    "EncoderNullMode",
    "ExactJacobian",
    "ProjectionMode",
    "Sketch",
    "StepContext",
    "StepState",
    "Unconstrained",
    "batched_vjp_jacobian",
    "defended_feature_parts",
    "defended_features",
    "encoder_null_space",
    "encoder_null_warnings",
    "example_jacobians",
    "flatten_example",
    "packed_jacobians",
    "project_out_basis",
    "rescale_to_budget",
    "sketch_basis",
    "unflatten_example",
]
