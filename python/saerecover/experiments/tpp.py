"""The TPP study (SAEBench targeted probe perturbation): per target class, zero-ablate its
latents, keep the valid flips, recover the probe logit; one run per class in one collection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saerecover.core.clamp import Clamp
from saerecover.data.text_classes import TextClasses
from saerecover.experiments.pipeline import recover
from saerecover.report.collections import collection_table, write_collection_report
from saerecover.runs import collection
from saerecover.runs.stats import summarize
from saerecover.tasks.text import CONTEXT_LENGTH
from saerecover.tasks.tpp import TPPSetup, fit


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
            top_n: int = 10, projection: str | Sequence[str] = ("none", "encoder"),
            context_length: int = CONTEXT_LENGTH, probe: Mapping[str, Any] | None = None, seed: int = 0,
            loss: str = "logit", batch_size: int = 32, progress: bool = False, overwrite: bool = False,
            report: bool = True, setup: TPPSetup | None = None, **overrides: Any) -> TPPResult:
    """TPP end to end: fit probes and latents, then per target class zero-ablate its top-N latents
    (all positions, SAE error kept) and recover the probe with delta at the pooled rows.

    Writes ``OUT/class-<c>/`` (one run directory per class), ``OUT/probes.safetensors`` and the
    combined ``OUT/summary.json`` / ``report.md`` (per class and pooled over classes, per mode).
    overrides: RecoveryConfig fields (defaults :data:`TPP_RECOVERY`).
    """
    root = collection.prepare(out)
    setup = setup or fit(model, site, data, classes=classes, top_n=top_n, context_length=context_length,
                         probe=probe, seed=seed, loss=loss, batch_size=batch_size)
    setup.probes.save(root / "probes.safetensors")
    modes = [projection] if isinstance(projection, str) else list(projection)
    cfg = {**TPP_RECOVERY, "seed": seed, **overrides}
    runs: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    all_records: list[dict[str, Any]] = []
    for c, task in setup.tasks.items():
        clamp = Clamp({site: setup.latents[c]}, mode="zero", where="all")
        res = recover(setup.probed, clamp, task, projection=modes, out=root / collection.member_name("class", c),
                      batch_size=batch_size, progress=progress, overwrite=overwrite, report=report,
                      extra_config={"tpp": {"class": c, "top_n": top_n, "latents": setup.latents[c].tolist()}},
                      **cfg)
        runs[c] = res
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
    summary = {
        "collection": "tpp",
        "task": "tpp",
        "hook_name": site.hook_name,
        "top_n": top_n,
        "classes": list(setup.tasks),
        "probes": setup.probes.describe(),
        "data": setup.data.describe(),
        "recovery": cfg,
        "n_examples": pooled["n_examples"],
        "n_valid": pooled["n_valid"],
        "per_class": per_class,
        "modes": {m: collection.mode_row(pooled["modes"][m]) for m in modes},
        "intervals": pooled["intervals"],
    }
    write_collection_report(root, summary)
    return TPPResult(summary=summary, runs=runs, setup=setup, path=root)
