"""Feature selection: which SAE features carry a behavior at a site."""

from __future__ import annotations

import numbers
import warnings

import torch

from saerecover.core.examples import Examples, Task
from saerecover.core.sites import Site
from saerecover.models.base import ModelAdapter, parse_site_name
from saerecover.models.memory import run_in_chunks


def attribution_scores(
    model: ModelAdapter,
    site: Site,
    task: Task,
    ex: Examples,
    *,
    positions: str = "answer",
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean over examples of activation x gradient of the task score at the site, (d_sae,).

    The SAE is spliced in with its error term held fixed, so the gradient reaching a feature is
    the score's sensitivity to that feature's decoder direction. Summed over the rows selected
    by ``positions`` ("answer" as in the paper, or "all"), averaged over examples.
    """
    _check_site_and_examples(model, site, ex, batch_size)
    def chunk_scores(start: int, stop: int) -> torch.Tensor:
        part = ex.select(list(range(start, stop))).to(model.device)
        mask = part.position_mask(positions)
        saved: dict[str, torch.Tensor] = {}

        def splice(h: torch.Tensor) -> torch.Tensor:
            z = site.encode(h.detach()).requires_grad_(True)
            recon = site.decode(z)
            saved["z"] = z
            return (recon + (h.float() - recon).detach()).to(h.dtype)

        with torch.enable_grad():
            logits, _ = model.forward(part.input_ids, part.attention_mask, edits={site.hook_name: splice})
            score = task.score(logits, part).sum()
            (grad,) = torch.autograd.grad(score, saved["z"])
        contrib = (saved["z"].detach() * grad) * mask.unsqueeze(-1)
        return contrib.sum(dim=(0, 1)).double().cpu()

    # out of memory: the chunk is halved and retried (saerecover.models.memory)
    parts = run_in_chunks(len(ex), batch_size, chunk_scores, what="attribution scores")
    total = torch.zeros(site.d_sae, dtype=torch.float64)
    for part_total in parts:
        total += part_total
    return (total / max(len(ex), 1)).float()


def _check_site_and_examples(model: ModelAdapter, site: Site, ex: Examples, batch_size: int) -> None:
    """Fail fast, before any forward pass, on a site the model lacks or cannot feed."""
    if not isinstance(site, Site):
        raise TypeError(f"site must be a saerecover Site (see load_site), got {type(site).__name__}")
    if site.hook_name not in model.site_names():
        parse_site_name(site.hook_name, model.n_layers)
        raise ValueError(f"unknown hook name {site.hook_name!r}; valid sites: {model.site_names()}")
    site.check_model_width(model.d_model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(ex) == 0:
        raise ValueError("no examples: feature attribution needs at least one")
    ex.validate()


def top_features(scores: torch.Tensor, k: int, *, positive_only: bool = True) -> torch.Tensor:
    """Indices of the k highest scores (only positive ones when ``positive_only``), (<=k,) long."""
    if k <= 0:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if positive_only:
        pos = torch.nonzero(scores > 0).flatten()
        if pos.numel() == 0:
            raise ValueError("no feature has a positive attribution to the behavior at this site")
        order = torch.argsort(scores[pos], descending=True)[:k]
        return pos[order].sort().values
    return torch.topk(scores, min(k, scores.numel())).indices.sort().values


def select_by_attribution(
    model: ModelAdapter, site: Site, task: Task, ex: Examples, *, top_k: int = 16, positions: str = "answer"
) -> torch.Tensor:
    """The top-k features by positive attribution to the behavior (PAPER_NOTES, IOI row); fewer
    when fewer have a positive attribution, with a warning (:func:`fewer_features_note`)."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    feats = top_features(attribution_scores(model, site, task, ex, positions=positions), top_k)
    note = fewer_features_note(site.hook_name, top_k, len(feats), "a positive attribution to the behavior")
    if note is not None:
        warnings.warn(note, stacklevel=2)
    return feats


def fewer_features_note(hook_name: str, requested: int, selected: int, criterion: str) -> str | None:
    """The warning (and run-config note) when a selection returns fewer features than
    requested, because only ``selected`` pass ``criterion``; None when none are missing."""
    if selected >= requested:
        return None
    return (f"{hook_name}: {selected} features selected where top_k={requested} was asked: only {selected} have "
            f"{criterion}")
