"""Running a model only as far as it is needed: the residual at one site, the forward pass
stopped there when nothing later matters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class _StopAtSite(Exception):
    """Raised from the edit at the probe site once its residual is read (nothing later matters)."""


def run_to_site(model: Any, hook_name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                edits: Mapping[str, Any] | None = None, capture: tuple[str, ...] = ()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The residual at ``hook_name`` after that site's edit, (n, seq, d_model), attached to the
    graph. The forward pass stops there unless an edit or capture needs a later site."""
    order = {name: i for i, name in enumerate(model.site_names())}
    if hook_name not in order:
        raise ValueError(f"unknown hook name {hook_name!r}; valid sites: {list(order)}")
    edits = dict(edits or {})
    stop = not capture and all(order.get(n, -1) <= order[hook_name] for n in edits)
    inner = edits.get(hook_name)
    store: dict[str, torch.Tensor] = {}

    def read(h: torch.Tensor) -> torch.Tensor:
        out = inner(h) if inner is not None else h
        store["h"] = out
        if stop:
            raise _StopAtSite
        return out

    edits[hook_name] = read
    captured: dict[str, torch.Tensor] = {}
    try:
        _, captured = model.forward(input_ids, attention_mask, edits=edits, capture=capture)
    except _StopAtSite:
        pass
    return store["h"], captured
