"""The method: sites (a hook and its SAE), clamps, the defended model, feature selection, the
projection modes (C1, J), the recovery loop with its budget (C4) and checkpoints, and the
per-example metrics. ``saerecover.linalg`` below it does the projection math."""
