"""The TPP study (SAEBench targeted probe perturbation): per target class, zero-ablate its
latents, keep the valid flips, recover the probe logit; one run per class in one collection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saerecover.core import protocol as protocols
from saerecover.core.clamp import Clamp
from saerecover.data.text_classes import TextClasses
from saerecover.experiments.pipeline import recover
from saerecover.experiments.study import Study, study_dir
from saerecover.report.collections import collection_table, write_collection_report
from saerecover.runs import collection
from saerecover.runs.stats import summarize
from saerecover.tasks.text import CONTEXT_LENGTH
from saerecover.tasks.tpp import TPPSetup, fit, tpp_metric


@dataclass
class TPPResult:
    """Per-class runs and the combined summary (``OUT/summary.json``)."""

    summary: dict[str, Any]
    runs: dict[str, Any]  # class -> RunResult
    setup: TPPSetup
    path: Path | None = None

    def table(self) -> str:
        return collection_table(self.summary)


#: TPP recovery defaults: the engine's (paper IOI) optimiser with delta on every pooled row.
TPP_RECOVERY: dict[str, Any] = {"steps": 100, "lr": 0.1, "budget": 20.0, "positions": "all"}


def run_tpp(model: Any, site: Any, data: TextClasses, *, out: str | Path, classes: Sequence[str] | None = None,
            top_n: int | None = None, projection: str | Sequence[str] = ("none", "encoder"),
            context_length: int = CONTEXT_LENGTH, probe: Mapping[str, Any] | None = None, seed: int = 0,
            loss: str = "logit", batch_size: int = 32, progress: bool = False, overwrite: bool = False,
            report: bool = True, setup: TPPSetup | None = None, protocol: str | Mapping[str, Any] | None = None,
            probe_trainer: str | None = None, executor: Any = None, **overrides: Any) -> TPPResult:
    """TPP end to end: fit probes and latents, then per target class zero-ablate its top-N latents
    (all positions, SAE error kept) and recover the probe with delta at the pooled rows.

    Writes ``OUT/class-<c>/`` (one run directory per class), ``OUT/probes.safetensors`` and the
    combined ``OUT/summary.json`` / ``report.md``: per class; the unweighted mean over the target
    classes (``class_mean``, the headline: the paper averages its targets); pooled over all valid
    examples (``modes``, the weighted number); and SAEBench's TPP metric of the clamp
    (``tpp_metric``: per class and mean).
    top_n, probe_trainer: None takes ``protocol``'s (saerecover: 10, "saerecover"; reference: 500,
    "saebench"; saerecover.core.protocol). overrides: RecoveryConfig fields (defaults
    :data:`TPP_RECOVERY`). executor: run the classes (each a run, cut into units) as one study
    on it (``recover``'s executor, docs/clusters.md); the probes are fitted here.
    """
    chosen = {"name": protocols.name_of(protocol),
              "choices": protocols.resolve("tpp", protocol, {"top_n": top_n, "probe_trainer": probe_trainer})}
    top_n = chosen["choices"]["top_n"]
    root = collection.prepare(out)
    setup = setup or fit(model, site, data, classes=classes, top_n=top_n, context_length=context_length,
                         probe=probe, seed=seed, loss=loss, batch_size=batch_size,
                         trainer=chosen["choices"]["probe_trainer"])
    setup.probes.save(root / "probes.safetensors")
    modes = [projection] if isinstance(projection, str) else list(projection)
    cfg = {**TPP_RECOVERY, "seed": seed, **overrides}
    study = Study(executor, study_dir(root), progress=progress) if executor is not None else None
    runs: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    all_records: list[dict[str, Any]] = []
    for c, task in setup.tasks.items():
        clamp = Clamp({site: setup.latents[c]}, mode="zero", where="all")
        runs[c] = recover(setup.probed, clamp, task, projection=modes, out=root / collection.member_name("class", c),
                          batch_size=batch_size, progress=progress, overwrite=overwrite, report=report,
                          extra_config={"tpp": {"class": c, "top_n": top_n, "latents": setup.latents[c].tolist()}},
                          protocol=chosen, executor=study, **cfg)
    if study is not None:
        runs = study.run(runs)
    for c, task in setup.tasks.items():
        res = runs[c]
        flips = res.flips
        per_class[c] = {
            "run_dir": str(Path(res.path).relative_to(root)) if res.path else None,
            "n_examples": len(task.ex),
            "latents": setup.latents[c].tolist(),
            "probe_test_accuracy": setup.probes.test_accuracy.get(c),
            "clean_positive_rate": float((flips.base > 0).float().mean()) if flips is not None else None,
            "ablated_positive_rate": float((flips.defended > 0).float().mean()) if flips is not None else None,
            "modes": {m: collection.mode_row(res.summary["modes"][m]) for m in modes},
        }
        all_records += res.records
    pooled = summarize(all_records, task="tpp", modes=modes)
    metric = tpp_metric(model, site, setup, context_length=context_length, batch_size=batch_size)
    summary = {
        "collection": "tpp",
        "task": "tpp",
        "hook_name": site.hook_name,
        "top_n": top_n,
        "protocol": chosen["name"],
        "classes": list(setup.tasks),
        "probes": setup.probes.describe(),
        "data": setup.data.describe(),
        "recovery": cfg,
        "n_examples": pooled["n_examples"],
        "n_valid": pooled["n_valid"],
        "per_class": per_class,
        "class_mean": class_mean(per_class, modes),
        "modes": {m: collection.mode_row(pooled["modes"][m]) for m in modes},
        "tpp_metric": metric,
        "intervals": pooled["intervals"],
    }
    write_collection_report(root, summary)
    return TPPResult(summary=summary, runs=runs, setup=setup, path=root)


#: The per-class numbers averaged (unweighted) over the target classes in ``class_mean``.
CLASS_MEAN_KEYS = ("recovery_rate", "zero_reactivation_rate", "activation_drift_mean", "relative_drift_mean",
                   "decode_drift_mean", "floor_violation_mean", "reactivated_fraction_mean",
                   "reactivated_fraction_eligible_mean", "delta_norm_mean", "relative_delta_norm_mean",
                   "budget_mean", "relative_budget_mean")


def class_mean(per_class: Mapping[str, Any], modes: Sequence[str]) -> dict[str, Any]:
    """The headline of a TPP collection, per mode: each number of :data:`CLASS_MEAN_KEYS` averaged
    without weights over the target classes that have one (classes without valid flips have no
    rates), as the paper's table (the mean of its 20 targets' per-target means); ``n_valid`` and
    ``recovered`` are sums, ``n_classes`` the classes averaged (per key: ``n_classes_<key>``),
    ``c1_residual_max`` the maximum."""
    out: dict[str, Any] = {}
    for m in modes:
        rows = [info["modes"][m] for info in per_class.values()]
        row: dict[str, Any] = {"n_classes": sum(1 for r in rows if r.get("recovery_rate") is not None),
                               "n_valid": sum(r.get("n_valid") or 0 for r in rows),
                               "recovered": sum(r.get("recovered") or 0 for r in rows)}
        for key in CLASS_MEAN_KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            row[key] = sum(vals) / len(vals) if vals else None
            if len(vals) != row["n_classes"]:
                row[f"n_classes_{key}"] = len(vals)
        c1 = [r["c1_residual_max"] for r in rows if r.get("c1_residual_max") is not None]
        row["c1_residual_max"] = max(c1) if c1 else None
        out[m] = row
    return out
