"""``none``: the unconstrained baseline; only C4 (rescaling to the budget) applies."""

from __future__ import annotations

from saerecover.core.projection.base import ProjectionMode


class Unconstrained(ProjectionMode):
    """No projection: the optimizer's step is taken as it is, then rescaled to the budget."""

    name = "none"
