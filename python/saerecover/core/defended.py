"""The defended model: a model with a clamp active, and room for a recovery delta.

At every clamped site the residual becomes the defended state h_def; delta is added after the
clamp at its own site (h_rec = h_def + delta). With ``reclamp=True`` the clamp is applied again
after delta, a stronger defender.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from saerecover.core.clamp import Clamp, SiteClamp
from saerecover.core.examples import Examples
from saerecover.models.base import Edit, ModelAdapter, parse_site_name


@dataclass
class SiteState:
    """What happened at one site in the last forward pass: (n, seq, d_model) tensors."""

    h_def: torch.Tensor
    h_rec: torch.Tensor


@dataclass
class ForwardResult:
    logits: torch.Tensor  # (n, seq, vocab) float32
    sites: dict[str, SiteState] = field(default_factory=dict)


class DefendedModel:
    """``model`` with ``clamp`` active. Checks, once, that every clamped site exists and that
    each SAE's width matches the model."""

    def __init__(self, model: ModelAdapter, clamp: Clamp) -> None:
        self.model = model
        self.clamp = clamp
        valid = set(model.site_names())
        for sc in clamp.site_clamps:
            parse_site_name(sc.site.hook_name, model.n_layers)
            if sc.site.hook_name not in valid:
                raise ValueError(f"unknown hook name {sc.site.hook_name!r}; valid sites: {sorted(valid)}")
            sc.site.check_model_width(model.d_model)

    def check_delta_site(self, hook_name: str) -> None:
        if hook_name not in self.model.site_names():
            parse_site_name(hook_name, self.model.n_layers)
            raise ValueError(f"unknown hook name {hook_name!r} for delta")

    def forward(
        self,
        ex: Examples,
        deltas: Mapping[str, torch.Tensor] | None = None,
        *,
        reclamp: bool = False,
        defended: bool = True,
        track: tuple[str, ...] = (),
    ) -> ForwardResult:
        """Run the defended model on ``ex``.

        deltas: hook name -> (n, seq, d_model) float32 perturbation added after that site's
        clamp. defended=False runs the base model (deltas still apply). track: sites whose
        h_def / h_rec are returned (sites with a delta are always tracked).
        """
        deltas = dict(deltas or {})
        states: dict[str, SiteState] = {}
        edits: dict[str, Edit] = {}
        names = set(deltas) | set(track) | ({sc.site.hook_name for sc in self.clamp.site_clamps} if defended else set())
        for name in names:
            sc = self.clamp.at(name) if defended else None
            edits[name] = self._edit(name, sc, deltas.get(name), reclamp, states)
        logits, _ = self.model.forward(ex.input_ids, ex.attention_mask, edits=edits)
        return ForwardResult(logits=logits, sites=states)

    @staticmethod
    def _edit(name: str, sc: SiteClamp | None, delta: torch.Tensor | None, reclamp: bool,
              states: dict[str, SiteState]) -> Edit:
        def edit(h: torch.Tensor) -> torch.Tensor:
            h_def = sc.defend(h) if sc is not None else h
            if delta is None:
                h_rec = h_def
            else:
                h_rec = (h_def.float() + delta).to(h.dtype)
                if reclamp and sc is not None:
                    h_rec = sc.defend(h_rec)
            states[name] = SiteState(h_def=h_def, h_rec=h_rec)
            return h_rec

        return edit
