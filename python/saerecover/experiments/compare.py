"""Which intervention survives: defenses, or SAEs, compared under the same recovery attack.

:func:`compare_defenses` builds every defense (:mod:`saerecover.core.defenses`) from one clamp;
:func:`compare_saes` takes one clamp per SAE. Each member is attacked by the same budget sweep
(:func:`saerecover.experiments.sweeps.budget_sweep`, budgets relative to the defended residual's
scale), in its own directory of the collection, one run directory per budget:

    OUT/<member>/budget-<b>/     an ordinary run directory (resumes on its own)
    OUT/<member>/summary.json    the member's budget sweep, with its robustness entry
    OUT/summary.json             ``"collection": "compare"``: per member valid flips, recovery
                                 rate per budget (Wilson), robustness, collateral cost, rank
    OUT/report.md|html, plots/   ranked table and the robustness / collateral frontier

A defense applied again after delta (``reclamp``) is judged, for its valid flips, at the attack's
starting point: applied again after a zero delta (:class:`~saerecover.core.defenses.reapplied.Reapplied`),
since a second application of a non-idempotent defense can undo a flip with no delta at all.

The robustness score of a member (per mode) is the mean over its examples valid at every budget
of the share of the budget grid below the example's smallest recovering budget (1 when never
recovered): 0 when every example is recovered at the smallest budget, 1 when none is at any;
with a bootstrap 95% interval over examples. A hardened defense (``hardened:R``) is R + 1
members, one per round, each round's ablated subspace grown from the previous round's recovered
deltas; its last round is the defense's point on the frontier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saerecover.core.clamp import Clamp
from saerecover.core.defenses import Defense, DefenseContext
from saerecover.core.defenses.reapplied import Reapplied
from saerecover.experiments.collateral import Collateral
from saerecover.experiments.sweeps import budget_sweep, check_grid
from saerecover.report.collections import collection_table, write_collection_report
from saerecover.report.saebench import EXPORT_DIR, RELEASE, results_filename, sae_id, write_saebench
from saerecover.runs import collection
from saerecover.runs.directory import open_run
from saerecover.runs.stats import bootstrap_ci

__all__ = ["CompareResult", "compare_defenses", "compare_saes", "frontier", "recovered_deltas", "robustness_score"]

#: Keys of a member's budget-sweep row kept in the compare summary.
RATE_KEYS = ("mode", "budget", "n_valid", "recovered", "recovery_rate", "recovery_rate_ci95",
             "relative_delta_norm_mean")


@dataclass
class CompareResult:
    """The combined summary, each member's sweep, and where they were written."""

    summary: dict[str, Any]
    sweeps: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def table(self) -> str:
        return collection_table(self.summary)


def robustness_score(per_example: Mapping[str, float | None], grid: Sequence[float]) -> dict[str, Any]:
    """Mean over examples of the share of ``grid`` below each example's smallest recovering
    budget (None: never recovered, share 1), with a bootstrap 95% interval; ``n`` examples."""
    grid = sorted(grid)
    vals = [1.0 if b is None else sum(1 for g in grid if g < b) / len(grid) for b in per_example.values()]
    if not vals:
        return {"score": None, "score_ci95": None, "n": 0}
    ci = bootstrap_ci(vals)
    return {"score": sum(vals) / len(vals), "score_ci95": list(ci) if ci else None, "n": len(vals)}


def recovered_deltas(sweep: Any, modes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Delta site -> the stacked optimised rows (m, d_model) of every recovered valid example
    of every run of ``sweep`` (a SweepResult), read back from the run directories."""
    rows: dict[str, list[torch.Tensor]] = {}
    for res in sweep.runs.values():
        run = open_run(res.path)
        sites = run.config.get("delta_sites") or [run.config["delta_site"]]
        for r in run.records():
            if r.get("mode") in modes and r.get("valid") is True and r.get("recovered") is True \
                    and r.get("failed") is not True:
                t = run.load_tensors(r["mode"], str(r["example_id"]))
                for i, s in enumerate(sites):
                    key = "delta" if i == 0 else f"delta@{s}"
                    if key in t:
                        rows.setdefault(s, []).append(t[key].reshape(-1, t[key].shape[-1]))
    return {s: torch.cat(v) for s, v in rows.items()}


@dataclass
class _Member:
    name: str
    clamp: Clamp
    recovery: dict[str, Any]
    info: dict[str, Any]
    reference_clamp: Clamp


def _run_member(m: _Member, model: Any, task: Any, grid: list[float], root: Path, modes: list[str],
                collateral: Collateral | None, sweep_kw: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict, Any]:
    recovery = {**overrides, **m.recovery}
    if recovery.get("reclamp"):  # the valid flips of the attack's starting point: the defense applied twice
        task = Reapplied(task, [m.clamp.site_clamps[0].site.hook_name])
    sweep = budget_sweep(model, m.clamp, task, grid, out=root / m.name, projection=modes, relative=True,
                         extra_config={"compare": m.info}, **sweep_kw, **recovery)
    s = sweep.summary
    rob = {mode: {k: v for k, v in r.items() if k != "per_example"} | robustness_score(r["per_example"], grid)
           for mode, r in s["robustness"].items()}
    entry = {
        "name": m.name,
        **m.info,
        "n_examples": s.get("n_examples"),
        "n_valid": s.get("n_valid"),
        "rates": [{k: row.get(k) for k in RATE_KEYS} for row in s["budget_sweep"]],
        "robustness": rob,
        "collateral": collateral.measure(model, m.clamp, m.reference_clamp) if collateral is not None else None,
        "dir": m.name,
    }
    return entry, sweep


def frontier(points: Mapping[str, tuple[float, float]]) -> set[str]:
    """The names whose (robustness, cost) no other point dominates: none is at least as robust
    at no more cost and strictly better in one of the two."""
    def dominated(s: float, c: float) -> bool:
        return any(so >= s and co <= c and (so > s or co < c) for so, co in points.values())

    return {name for name, (s, c) in points.items() if not dominated(s, c)}


def _finish(root: Path, summary: dict[str, Any], members: list[dict[str, Any]],
            sweeps: dict[str, Any]) -> CompareResult:
    mode = summary["score_mode"]
    headline = [m for m in members if m.get("headline", True)]

    def key(m: Mapping[str, Any]) -> tuple[float, float]:
        score = m["robustness"].get(mode, {}).get("score")
        kl = (m.get("collateral") or {}).get("kl_mean")
        return (-(score if score is not None else -1.0), kl if kl is not None else float("inf"))

    ranked = sorted(headline, key=key)
    for i, m in enumerate(ranked):
        m["rank"] = i + 1
    placed = frontier({m["name"]: (-key(m)[0], key(m)[1]) for m in headline
                       if m["robustness"].get(mode, {}).get("score") is not None})
    for m in headline:
        m["pareto"] = m["name"] in placed
    summary["members"] = members
    summary["ranking"] = [m["name"] for m in ranked]
    write_collection_report(root, summary)
    return CompareResult(summary=summary, sweeps=sweeps, path=root)


def _summary(kind: str, task: Any, grid: list[float], modes: list[str], overrides: Mapping[str, Any],
             collateral: Collateral | None) -> dict[str, Any]:
    return {
        "collection": "compare",
        "kind": kind,
        "task": getattr(task, "name", "task"),
        "budgets": grid,
        "relative": True,
        "modes": modes,
        "score_mode": modes[0],
        "recovery": dict(overrides),
        "collateral": {"non_target": collateral.description if collateral is not None else None,
                       "kl": "KL(p_base || p_defended) of next-token distributions, mean over each reference "
                             "text's tokens, then over texts (bootstrap 95%)",
                       "n_reference_texts": len(collateral.reference) if collateral is not None else None},
        "score": "mean over examples valid at every budget of the share of the budget grid below the smallest "
                 "recovering budget (never recovered: 1); bootstrap 95% over examples",
        "intervals": {"rates": "Wilson score 95%", "score": "bootstrap 95%", "kl": "bootstrap 95%"},
    }


def compare_defenses(model: Any, clamp: Clamp, task: Any, defenses: Sequence[Defense], budgets: Sequence[float], *,
                     out: str | Path, reference: Any = None, collateral: Collateral | None = None,
                     projection: str | Sequence[str] = ("encoder",), batch_size: int = 32, progress: bool = False,
                     overwrite: bool = False, report: bool = False, protocol: Any = None,
                     **overrides: Any) -> CompareResult:
    """Attack every defense of ``defenses`` built from ``clamp`` with the same budget sweep
    (``budgets`` relative to the defended residual's scale), one member per defense (per round
    for an iterated one), and measure each one's collateral cost.

    reference: the Examples a defense may measure (error-mean's mean error); the collateral's
    reference texts by default. overrides: RecoveryConfig fields for every run (a defense's own,
    such as ``reclamp``, win).
    """
    grid = check_grid(budgets, "budgets", integer=False)
    modes = [projection] if isinstance(projection, str) else list(projection)
    if not defenses:
        raise ValueError("give at least one defense")
    root = collection.prepare(out)
    ctx = DefenseContext(model, reference if reference is not None else (collateral.reference if collateral else None))
    sweep_kw = {"batch_size": batch_size, "progress": progress, "overwrite": overwrite, "report": report,
                "protocol": protocol}
    members: list[dict[str, Any]] = []
    sweeps: dict[str, Any] = {}
    for defense in defenses:
        d = defense
        while True:
            built = d.build(clamp, ctx)
            info = {"kind": "defense", **d.describe(), "group": d.label, "headline": d.round == d.rounds - 1}
            m = _Member(d.member, built, dict(d.recovery), info, clamp)
            entry, sweep = _run_member(m, model, task, grid, root, modes, collateral, dict(sweep_kw), dict(overrides))
            members.append(entry)
            sweeps[m.name] = sweep
            if d.round + 1 >= d.rounds:
                break
            d = d.harden(recovered_deltas(sweep, modes))
    return _finish(root, _summary("defenses", task, grid, modes, overrides, collateral), members, sweeps)


def compare_saes(model: Any, clamps: Mapping[str, Clamp], task: Any, budgets: Sequence[float], *, out: str | Path,
                 saes: Mapping[str, Mapping[str, Any]] | None = None, collateral: Collateral | None = None,
                 projection: str | Sequence[str] = ("encoder",), batch_size: int = 32, progress: bool = False,
                 overwrite: bool = False, report: bool = False, protocol: Any = None,
                 **overrides: Any) -> CompareResult:
    """Attack the clamp of every SAE (``clamps``: member name -> Clamp built on that SAE) with
    the same budget sweep, and measure each one's collateral cost. saes: member name -> what
    the summary and the SAEBench-layout export record of the SAE (id, hook_name, source, d_sae, cfg)."""
    grid = check_grid(budgets, "budgets", integer=False)
    modes = [projection] if isinstance(projection, str) else list(projection)
    if len(clamps) < 1:
        raise ValueError("give at least one SAE")
    root = collection.prepare(out)
    sweep_kw = {"batch_size": batch_size, "progress": progress, "overwrite": overwrite, "report": report,
                "protocol": protocol}
    members: list[dict[str, Any]] = []
    sweeps: dict[str, Any] = {}
    for name, clamp in clamps.items():
        info = {"kind": "sae", "sae": dict((saes or {}).get(name, {})), "group": name, "headline": True}
        m = _Member(collection.member_name("sae", name), clamp, {}, info, clamp)
        entry, sweep = _run_member(m, model, task, grid, root, modes, collateral, dict(sweep_kw), dict(overrides))
        members.append(entry)
        sweeps[m.name] = sweep
    summary = _summary("saes", task, grid, modes, overrides, collateral)
    summary["saebench_export"] = [f"{EXPORT_DIR}/{results_filename(RELEASE, sae_id(m))}" for m in members]
    result = _finish(root, summary, members, sweeps)
    write_saebench(root, result.summary, sae_lens_version=_version("sae-lens"),
                   saerecover_version=_version("saerecover"))
    return result


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
