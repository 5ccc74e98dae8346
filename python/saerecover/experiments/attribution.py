"""Recovery-path attribution by behavioral replay (PAPER_NOTES, "Recovery-path attribution").

For each recovered example, the delta at its site is split by ``analysis.decompose`` into the
full delta, the SAE-explained part, the clamped and non-clamped parts of dz decoded, the top-k
non-clamped features decoded, the top-k knockout (delta minus that) and the SAE residual
delta_res = delta - (D(E(h_rec)) - D(E(h_def))). Each component is replayed alone as an
additive perturbation at the same site and rows, with the clamp active, and judged like the run
(for refusal: generation, then the refusal detector; for score-based tasks such as IOI, TPP and
unlearning: the task's score > 0). Decoder directions are
not orthogonal, so these replay counts, not the norms, are the evidence for where recovery
lives; the paper's Table 10 reports them.

``saerecover attribute RUN_DIR`` (:func:`attribute_run`) does it for a finished run: model and
SAEs from the run's config, tensors from the run directory; it writes ``attribution.json`` and
``plots/attribution.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.decomposition import COMPONENTS, DEFAULT_TOP_K, decompose
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples
from saerecover.core.sites import Site, load_site
from saerecover.models import load_model
from saerecover.models.memory import run_in_chunks
from saerecover.progress import progress_bar
from saerecover.report.attribution import ATTRIBUTION_FILE, ATTRIBUTION_PLOT
from saerecover.report.format import markdown_table, num, rate
from saerecover.report.run import write_report
from saerecover.runs import atomic_write_json, open_run
from saerecover.runs.stats import wilson_interval
from saerecover.tasks import task_from_config

ATTRIBUTION_SCHEMA = 1


@dataclass
class ReplayItem:
    """One recovered example to attribute: its delta and defended state at the delta site.

    h_def, delta: (rows, d_model); rows: (rows,) the sequence positions they sit at.
    """

    example_id: str
    h_def: torch.Tensor
    delta: torch.Tensor
    rows: torch.Tensor
    mode: str = ""


@dataclass
class AttributionResult:
    """Replay outcomes per mode and component, plus per-example details."""

    site: str
    top_k: int
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self, mode: str) -> dict[str, int]:
        """Component -> number of examples whose replay alone recovers the behavior."""
        return {c: v["recovered"] for c, v in self.modes.get(mode, {}).get("components", {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return _plain({"attribution_schema": ATTRIBUTION_SCHEMA, "site": self.site, "top_k": self.top_k,
                       "components": list(COMPONENTS), "modes": self.modes, "examples": self.examples,
                       "notes": self.notes})

    def table(self) -> str:

        parts = []
        for mode, agg in self.modes.items():
            n = agg["n"]
            rows = [[c, f"{v['recovered']}/{n}", rate(v["rate"]) if v["rate"] is not None else "n/a",
                     num(v["norm_mean"]), num(v["share_mean"])] for c, v in agg["components"].items()]
            parts.append(f"mode {mode}: {n} recovered examples replayed at {self.site} (clamp active)")
            parts.append(markdown_table(["component", "recovers alone", "rate", "mean norm",
                                          "mean share of norm(delta)"], rows))
            parts.append("")
        return "\n".join(parts) if parts else "(nothing to attribute: no recovered examples)"


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, torch.Tensor):
        return _plain(obj.tolist())
    return obj


def replay(defended: DefendedModel, task: Any, ex: Examples, items: Sequence[ReplayItem], *, site: Site,
           features: torch.Tensor, top_k: int = DEFAULT_TOP_K, reclamp: bool = False,
           batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:
    """Decompose every item's delta and replay each component under the active clamp.

    ex: the task's examples (items are looked up by example id). progress: a bar over the
    replays (one per item and component). Returns one dict per item:
    ``example_id``, ``mode``, ``replay`` (component -> bool, behavior present), ``norms``,
    ``shares``, ``topk_features``, ``n_changed``.
    """
    index = {eid: i for i, eid in enumerate(ex.ids)}
    missing = [it.example_id for it in items if it.example_id not in index]
    if missing:
        raise ValueError(f"examples {missing[:5]} are not among the task's examples")
    results: list[dict[str, Any]] = []
    pairs: list[tuple[int, str, torch.Tensor]] = []  # (item, component, (rows, d))
    for j, it in enumerate(items):
        dec = decompose(site, features, it.h_def, it.delta, top_k=top_k)
        results.append({"example_id": it.example_id, "mode": it.mode, "replay": {},
                        "norms": dec["norms"], "shares": dec["shares"],
                        "topk_features": [int(i) for i in dec["topk_features"].tolist()],
                        "n_changed": dec["n_changed"]})
        for name in COMPONENTS:
            pairs.append((j, name, dec["components"][name].detach().float().cpu()))
    d_model = defended.model.d_model
    bar = progress_bar(len(pairs), "attribution replays", enabled=progress, unit="replay")
    def replay_chunk(start: int, stop: int) -> None:
        chunk = pairs[start:stop]
        part = ex.select([index[items[j].example_id] for j, _, _ in chunk])
        width = part.input_ids.shape[1]
        delta = torch.zeros(len(chunk), width, d_model)
        for b, (j, _, comp) in enumerate(chunk):
            rows = items[j].rows.long().cpu()
            if int(rows.max()) >= width:
                raise ValueError(f"rows of {items[j].example_id!r} reach {int(rows.max())}, beyond its "
                                 f"{width} columns")
            delta[b, rows] = comp
        deltas = {site.hook_name: delta.to(defended.model.device)}
        with torch.no_grad():
            if hasattr(task, "judge"):  # e.g. refusal: generate with the edits, then detect
                scores = task.judge(defended, part, with_clamp=True, deltas=deltas, reclamp=reclamp, stage="replay")
            else:  # score-based tasks (IOI, TPP, unlearning): B holds iff score > 0
                part = part.to(defended.model.device)
                scores = task.score(defended.forward(part, deltas, reclamp=reclamp).logits, part)
        for b, (j, name, _) in enumerate(chunk):
            results[j]["replay"][name] = bool(scores[b] > 0)
        bar.update(len(chunk))

    # out of memory: the chunk is halved and retried (saerecover.models.memory)
    run_in_chunks(len(pairs), batch_size, replay_chunk, what="attribution replays")
    bar.close()
    return results


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: n, and per component the replay count, rate with Wilson 95% interval, and
    mean norm / share of norm(delta) (the paper's Table 10 plus norms)."""
    by_mode: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        by_mode.setdefault(str(r["mode"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for mode, rs in by_mode.items():
        n = len(rs)
        comps = {}
        for c in COMPONENTS:
            k = sum(1 for r in rs if r["replay"].get(c))
            ci = wilson_interval(k, n)
            norms = [float(r["norms"][c]) for r in rs]
            shares = [float(r["shares"][c]) for r in rs]
            comps[c] = {"recovered": k, "rate": k / n if n else None, "rate_ci95": list(ci) if ci else None,
                        "norm_mean": sum(norms) / n if n else None, "share_mean": sum(shares) / n if n else None}
        out[mode] = {"n": n, "components": comps}
    return out


def attribute(defended: DefendedModel, task: Any, items: Sequence[ReplayItem], *, site: str | None = None,
              top_k: int = DEFAULT_TOP_K, reclamp: bool = False, batch_size: int = 16,
              progress: bool = False) -> AttributionResult:
    """Replay-attribute ``items`` (deltas at ``site``, default the first clamped site)."""
    name = site or defended.clamp.site_clamps[0].site.hook_name
    sc = defended.clamp.at(name)
    if sc is None:
        raise ValueError(f"attribution needs the delta site to be clamped (its SAE decomposes delta); {name!r} is not")
    res = AttributionResult(site=name, top_k=int(top_k))
    if not items:
        res.notes.append("no recovered examples to attribute")
        return res
    details = replay(defended, task, task.examples(), items, site=sc.site, features=sc.features, top_k=top_k,
                     reclamp=reclamp, batch_size=batch_size, progress=progress)
    res.examples = details
    res.modes = aggregate(details)
    bad = [d["example_id"] for d in details if not d["replay"].get("delta")]
    if bad:
        res.notes.append(f"replaying the full delta did not reproduce recovery for {len(bad)} example(s) "
                         f"({', '.join(bad[:5])}): generation is sensitive to round-off at decision boundaries")
    return res


def items_from_outcomes(outcomes: Mapping[str, Sequence[Any]], modes: Sequence[str] | None = None) -> list[ReplayItem]:
    """ReplayItems of the recovered outcomes of ``RunResult.outcomes`` (residual modes only:
    the "suffix" baseline acts on input embeddings, which no SAE decomposes)."""
    items = []
    for mode, ocs in outcomes.items():
        if mode == "suffix" or (modes is not None and mode not in modes):
            continue
        for oc in ocs:
            t = oc.tensors
            if oc.recovered and "h_def" in t and "rows" in t and not any(k.startswith("delta@") for k in t):
                items.append(ReplayItem(oc.example_id, t["h_def"], t["delta"], t["rows"], mode))
    return items


def plot_counts(result: AttributionResult, path: str | os.PathLike[str]) -> Path | None:
    """Grouped bar plot of replay counts per component (one bar per mode), as a PNG."""
    if not result.modes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result.modes)
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(8.0, 4.4))
    xs = list(range(len(COMPONENTS)))
    for m_i, mode in enumerate(modes):
        agg = result.modes[mode]
        counts = [agg["components"][c]["recovered"] for c in COMPONENTS]
        bars = ax.bar([x + (m_i - (len(modes) - 1) / 2) * width for x in xs], counts, width,
                      label=f"{mode} (n={agg['n']})")
        for b, c in zip(bars, counts):
            ax.annotate(str(c), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels([c.replace("_", "\n") for c in COMPONENTS], fontsize=8)
    ax.set_ylabel("recovered examples whose replay alone recovers")
    ax.set_title(f"Recovery-path attribution at {result.site} (clamp active)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# a finished run


def _clamp_from_config(entries: Sequence[Mapping[str, Any]], model: Any, saes: Mapping[str, Any] | None):
    parts = []
    for e in entries:
        hook = e["hook_name"]
        source = (saes or {}).get(hook) or e.get("sae")
        if not source or source == "<in-memory SAE>":
            raise ValueError(f"the run's config does not say where the SAE of {hook!r} came from; pass saes={{hook: DIR}}")
        site = load_site(source, hook_name=hook, model=model)
        if "center_input" in e:
            site.center_input = bool(e["center_input"])
        value = e.get("value", 0.0)
        if isinstance(value, list):
            parts.append(Clamp.per_feature(site, e["features"], value, mode=e.get("mode", "set"),
                                           where=e.get("where", "all")))
        else:
            parts.append(Clamp({site: e["features"]}, value=float(value), mode=e.get("mode", "set"),
                               where=e.get("where", "all")))
    return Clamp.combine(*parts)


def attribute_run(run_dir: str | os.PathLike[str], *, modes: Sequence[str] | None = None,
                  top_k: int = DEFAULT_TOP_K, device: str | None = None, model: Any = None,
                  saes: Mapping[str, Any] | None = None, requests: Sequence[str] | None = None,
                  batch_size: int = 16, write: bool = True, plot: bool = True,
                  progress: bool = False) -> AttributionResult:
    """Attribution replays on a finished refusal or IOI run: loads the model (``config["source"]
    ["model"]`` or ``config["model"]["name"]``, or ``model`` given) and the clamp's SAEs from the
    config, rebuilds the task (requests from the recorded source or ``requests``, matched by
    sha256; base responses regenerated, greedy), and replays the components of
    every recovered example of ``modes`` (default: every residual mode of the run). Writes
    RUN_DIR/attribution.json and RUN_DIR/plots/attribution.png, then the run's report again
    (report.md and report.html show the attribution). progress: a bar over the replays."""
    run = open_run(run_dir)
    cfg = run.config
    if model is None:
        src = cfg.get("source") or {}
        name = src.get("model") or (cfg.get("model") or {}).get("name")
        if not name:
            raise ValueError("the run's config names no model; pass model=")
        backend = src.get("backend") or (cfg.get("model") or {}).get("backend") or "hf"
        dtype = (cfg.get("model") or {}).get("dtype")
        model = load_model(str(name), backend=backend, device=device, dtype=dtype)
    clamp = _clamp_from_config(cfg.get("clamp") or [], model, saes)
    defended = DefendedModel(model, clamp)
    task = task_from_config(model, cfg.get("task") or {}, requests=requests)
    site = cfg.get("delta_site") or clamp.site_clamps[0].site.hook_name
    reclamp = bool((cfg.get("recovery") or {}).get("reclamp", False))
    run_modes = [m for m in (cfg.get("modes") or []) if isinstance(m, str)]
    wanted = list(modes) if modes is not None else run_modes
    items: list[ReplayItem] = []
    notes: list[str] = []
    for rec in run.records():
        if rec.get("mode") not in wanted or rec.get("mode") not in run_modes or rec.get("recovered") is not True:
            continue
        t = run.load_tensors(rec["mode"], rec["example_id"])
        if any(k.startswith("delta@") for k in t):
            notes.append(f"{rec['example_id']} ({rec['mode']}): multi-site delta, skipped")
            continue
        items.append(ReplayItem(rec["example_id"], t["h_def"], t["delta"], t["rows"], rec["mode"]))
    result = attribute(defended, task, items, site=site, top_k=top_k, reclamp=reclamp, batch_size=batch_size,
                       progress=progress)
    result.notes = notes + result.notes
    skipped = [m for m in wanted if m not in run_modes]
    if skipped:
        result.notes.append(f"modes {skipped} are not residual modes of this run (e.g. the suffix baseline acts "
                            "on input embeddings, which no SAE decomposes): not attributed")
    for mode in wanted:
        if mode in run_modes and mode not in result.modes:  # attributed, nothing recovered
            result.modes[mode] = {"n": 0, "components": {c: {"recovered": 0, "rate": None, "rate_ci95": None,
                                                             "norm_mean": None, "share_mean": None}
                                                         for c in COMPONENTS}}
    result.modes = {m: result.modes[m] for m in [*wanted, *result.modes] if m in result.modes}
    if write:
        atomic_write_json(run.path / ATTRIBUTION_FILE, result.to_dict())
    if plot:
        plot_counts(result, run.path / "plots" / ATTRIBUTION_PLOT)
    if write:
        write_report(run.path)
    return result


__all__ = [
    "ATTRIBUTION_FILE",
    "ATTRIBUTION_PLOT",
    "AttributionResult",
    "ReplayItem",
    "aggregate",
    "attribute",
    "attribute_run",
    "items_from_outcomes",
    "plot_counts",
    "replay",
]
