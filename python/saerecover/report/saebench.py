"""Per-SAE robustness scores of a ``compare saes`` collection in SAEBench's eval-result JSON
layout, so they can sit beside SAEBench's other metrics.

The layout followed (SAEBench 0.6.0, commit 8042bb3, ``sae_bench/evals/base_eval_output.py``,
``BaseEvalOutput``): top-level ``eval_type_id``, ``eval_config``, ``eval_id``,
``datetime_epoch_millis``, ``eval_result_metrics`` (categories, each a flat mapping of metric
name to number: ``BaseMetrics`` refuses nested dicts), ``eval_result_details`` (a list of flat
records), ``sae_bench_commit_hash``, ``sae_lens_id``, ``sae_lens_release_id``,
``sae_lens_version``, ``sae_cfg_dict`` and ``eval_result_unstructured``; one file per SAE named
``<release>_<sae_id>_eval_results.json`` with "/" replaced by "_"
(``sae_bench/sae_bench_utils/general_utils.py``, ``get_results_filepath``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.runs.files import atomic_write_json

EVAL_TYPE_ID = "saerecover_recovery_robustness"
#: The metric category of ``eval_result_metrics``.
CATEGORY = "recovery_robustness"
#: The export's folder in the collection.
EXPORT_DIR = "saebench"
RELEASE = "saerecover"

#: Keys every exported file has (the test reads them back).
TOP_LEVEL = ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
             "eval_result_details", "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version",
             "sae_cfg_dict", "eval_result_unstructured")


def results_filename(release: str, sae_id: str) -> str:
    """SAEBench's ``get_results_filepath`` file name: ``<release>_<sae_id>_eval_results.json``, "/" -> "_"."""
    return f"{release}_{sae_id}_eval_results.json".replace("/", "_")


def sae_id(member: Mapping[str, Any]) -> str:
    """The SAE's name in the export: its ``id`` (as given to ``compare saes``), else the member's."""
    return str((member.get("sae") or {}).get("id") or member["name"])


def _flat_metrics(member: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, float | int | None]:
    mode = summary["score_mode"]
    rob = member["robustness"].get(mode) or {}
    ci = rob.get("score_ci95") or [None, None]
    never_ci = rob.get("never_share_ci95") or [None, None]
    out: dict[str, float | int | None] = {
        "robustness_score": rob.get("score"),
        "robustness_score_ci_low": ci[0],
        "robustness_score_ci_high": ci[1],
        "median_smallest_recovering_budget": rob.get("median"),
        "never_recovered_share": rob.get("never_share"),
        "never_recovered_share_ci_low": never_ci[0],
        "never_recovered_share_ci_high": never_ci[1],
        "n_examples_scored": rob.get("n"),
        "valid_flips": member.get("n_valid"),
    }
    for r in member["rates"]:
        if r["mode"] == mode:
            out[f"recovery_rate_at_budget_{r['budget']:g}"] = r["recovery_rate"]
    col = member.get("collateral") or {}
    nt = col.get("non_target") or {}
    out["collateral_kl"] = col.get("kl_mean")
    out["collateral_non_target_accuracy"] = nt.get("accuracy")
    return out


def saebench_result(member: Mapping[str, Any], summary: Mapping[str, Any], *, sae_lens_version: str | None = None,
                    saerecover_version: str = "") -> dict[str, Any]:
    """One SAE's eval result in SAEBench's layout (a plain dict, JSON-ready)."""
    sae = member.get("sae") or {}
    config = {"task": summary["task"], "budgets_relative_to_residual": list(summary["budgets"]),
              "modes": list(summary["modes"]), "score_mode": summary["score_mode"], "score": summary["score"],
              "recovery": dict(summary.get("recovery") or {}), "hook_name": sae.get("hook_name")}
    details = [{"budget_relative": r["budget"], "mode": r["mode"], "n_valid": r["n_valid"], "recovered": r["recovered"],
                "recovery_rate": r["recovery_rate"],
                "recovery_rate_ci_low": (r.get("recovery_rate_ci95") or [None, None])[0],
                "recovery_rate_ci_high": (r.get("recovery_rate_ci95") or [None, None])[1]}
               for r in member["rates"]]
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {CATEGORY: _flat_metrics(member, summary)},
        "eval_result_details": details,
        # SAEBench's field holds the commit of the code that ran the eval; no SAEBench code ran here
        "sae_bench_commit_hash": f"none: exported by saerecover {saerecover_version}".strip(),
        "sae_lens_id": sae_id(member),
        "sae_lens_release_id": RELEASE,
        "sae_lens_version": sae_lens_version,
        "sae_cfg_dict": sae.get("cfg"),
        "eval_result_unstructured": {"member": member["name"], "source": sae.get("source"),
                                     "robustness": member["robustness"], "collateral": member.get("collateral")},
    }


def write_saebench(root: str | Path, summary: Mapping[str, Any], *, sae_lens_version: str | None = None,
                   saerecover_version: str = "") -> list[Path]:
    """Write ``ROOT/saebench/<release>_<sae_id>_eval_results.json`` for every SAE of a
    ``compare saes`` summary; their paths."""
    if summary.get("kind") != "saes":
        raise ValueError("the SAEBench export is per SAE: it needs a `compare saes` collection")
    root = Path(root)
    paths = []
    for member in summary["members"]:
        path = root / EXPORT_DIR / results_filename(RELEASE, sae_id(member))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, saebench_result(member, summary, sae_lens_version=sae_lens_version,
                                                saerecover_version=saerecover_version), root=root)
        paths.append(path)
    return paths


def read_saebench(path: str | Path) -> dict[str, Any]:
    """An exported file, checked to have SAEBench's top-level keys and flat metric categories."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in TOP_LEVEL if k not in data]
    if missing:
        raise ValueError(f"{path} lacks SAEBench eval-result keys {missing}")
    for cat, metrics in data["eval_result_metrics"].items():
        nested = [k for k, v in metrics.items() if isinstance(v, (dict, list))]
        if nested:
            raise ValueError(f"{path}: metric category {cat!r} is not flat ({nested})")
    return data
