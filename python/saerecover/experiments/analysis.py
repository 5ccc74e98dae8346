"""CPU-side re-analysis of a saved run: the metrics recomputed from the saved tensors alone, and
the recovery-path decomposition of every delta (PAPER_NOTES, "Metrics" and "Recovery-path
attribution").

Only the SAE of the delta site is loaded, never the model: everything is a function of
``h_def`` and ``delta`` at the optimized rows (tensors/<mode>/<example_id>.safetensors).
The behavioral outcome ``recovered`` needs the model and is taken from the record.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saerecover import linalg
from saerecover.core.decomposition import COMPONENTS, DEFAULT_TOP_K, decompose
from saerecover.core.metrics import EPS, clamped_features, example_metrics
from saerecover.core.sites import Site, load_site
from saerecover.report.format import markdown_table, num
from saerecover.runs import RunDirectory, RunDirectoryError, atomic_write_json, open_run
from saerecover.runs.directory import run_in_use

__all__ = [
    "ANALYSIS_FILE",
    "COMPONENTS",
    "AnalysisError",
    "AnalysisResult",
    "analyze_run",
    "compare_value",
    "decompose",
]

ANALYSIS_FILE = "analysis.json"
ANALYSIS_SCHEMA = 1


#: Saved tensors compared elementwise with their recomputation (max over elements).
TENSOR_CHECKS = ("z_def", "z_rec")


class AnalysisError(RunDirectoryError):
    """The run cannot be analyzed: no SAE source, a missing tensor, an unknown delta site."""


# --------------------------------------------------------------------------------------------
# the decomposition



# --------------------------------------------------------------------------------------------
# comparing recorded and recomputed values


def compare_value(recorded: Any, recomputed: Any, *, atol: float, rtol: float) -> dict[str, Any]:
    """abs/rel difference of one metric; ``ok`` when abs <= atol or rel <= rtol.

    rel = abs / max(|recorded|, |recomputed|). Booleans must be equal. A recorded null (the run
    stores non-finite values as null) matches a non-finite recomputation.
    """
    if isinstance(recomputed, bool) or isinstance(recorded, bool):
        same = recorded is recomputed or (recorded == recomputed and isinstance(recorded, bool))
        return {"abs": 0.0 if same else 1.0, "rel": 0.0 if same else 1.0, "ok": same}
    new = float(recomputed)
    if recorded is None:
        ok = not math.isfinite(new)
        return {"abs": 0.0 if ok else math.inf, "rel": 0.0 if ok else math.inf, "ok": ok}
    old = float(recorded)
    if not (math.isfinite(old) and math.isfinite(new)):
        ok = old == new or (math.isnan(old) and math.isnan(new))
        return {"abs": 0.0 if ok else math.inf, "rel": 0.0 if ok else math.inf, "ok": ok}
    diff = abs(old - new)
    scale = max(abs(old), abs(new))
    rel = diff / scale if scale > 0 else 0.0
    return {"abs": diff, "rel": rel, "ok": diff <= atol or rel <= rtol}


def _tensor_diff(saved: torch.Tensor, new: torch.Tensor, *, atol: float, rtol: float) -> dict[str, Any]:
    """Max elementwise difference, relative to the largest magnitude of the saved tensor."""
    if saved.shape != new.shape:
        return {"abs": math.inf, "rel": math.inf, "ok": False,
                "note": f"saved shape {tuple(saved.shape)} != recomputed {tuple(new.shape)}"}
    if saved.numel() == 0:
        return {"abs": 0.0, "rel": 0.0, "ok": True}
    a, b = saved.double(), new.double().to(saved.device)
    diff = float((a - b).abs().max())
    scale = max(float(a.abs().max()), float(b.abs().max()))
    rel = diff / scale if scale > 0 else 0.0
    return {"abs": diff, "rel": rel, "ok": diff <= atol or rel <= rtol}


# --------------------------------------------------------------------------------------------
# the result


def _json_float(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return _json_float(obj)


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` found.

    examples: one dict per analyzed (example_id, mode): ``checks`` (metric or tensor name ->
    recorded, recomputed, abs, rel, ok), ``encoder_null_share`` (||P delta|| / ||delta||, P the
    projection onto the null space of A_S^T; None without the Rust core) and
    ``decomposition`` (norms and shares of :data:`COMPONENTS`).
    modes: per-mode aggregates (max differences per check, means of the decomposition).
    """

    run_dir: Path
    site: dict[str, Any]
    atol: float
    rtol: float
    top_k: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[dict[str, Any]]:
        """Every check beyond tolerance: example_id, mode, name, recorded, recomputed, abs, rel."""
        out = []
        for ex in self.examples:
            for name, c in ex["checks"].items():
                if not c["ok"]:
                    out.append({"example_id": ex["example_id"], "mode": ex["mode"], "name": name,
                                **{k: c.get(k) for k in ("recorded", "recomputed", "abs", "rel")},
                                **({"note": c["note"]} if "note" in c else {})})
        return out

    @property
    def ok(self) -> bool:
        """True when every recomputed value matches and nothing needed was missing."""
        return not self.problems and not self.mismatches

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    def to_dict(self, *, per_example: bool = True) -> dict[str, Any]:
        """Plain JSON (non-finite numbers as null)."""
        out: dict[str, Any] = {
            "analysis_schema": ANALYSIS_SCHEMA,
            "run_dir": str(self.run_dir),
            "ok": self.ok,
            "tolerance": {"atol": self.atol, "rtol": self.rtol,
                          "rule": "ok when abs <= atol or abs / max(|recorded|, |recomputed|) <= rtol"},
            "site": self.site,
            "top_k": self.top_k,
            "n_examples": self.n_examples,
            "modes": self.modes,
            "mismatches": self.mismatches,
            "problems": self.problems,
            "skipped": self.skipped,
            "notes": self.notes,
        }
        if per_example:
            out["examples"] = self.examples
        return _plain(out)

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write :meth:`to_dict` atomically to ``path`` (default RUN_DIR/analysis.json).

        Refuses the run directory itself while a process holds its lock (the run is still
        being written): pass another ``path``.
        """
        target = Path(path) if path is not None else self.run_dir / ANALYSIS_FILE
        inside = target.resolve().parent == self.run_dir.resolve()
        if inside:
            pid = run_in_use(self.run_dir)
            if pid is not None:
                raise AnalysisError(
                    f"{self.run_dir} is being written by a running process (pid {pid}); not writing "
                    f"{target.name} into it: write the analysis elsewhere (--json PATH)"
                )
            target = self.run_dir / target.name  # never through a link inside the run
        return atomic_write_json(target, self.to_dict(), root=self.run_dir if inside else None)

    def table(self) -> str:
        """Per mode: the largest differences per metric, then the mean decomposition."""

        parts = []
        for mode, agg in self.modes.items():
            rows = [[name, str(c["n"]), num(c["max_abs"]), num(c["max_rel"]), str(c["n_mismatch"]),
                     c["worst_example"] or ""]
                    for name, c in agg["checks"].items()]
            parts.append(f"mode {mode}: {agg['n']} examples; recomputed vs recorded")
            parts.append(markdown_table(["metric", "n", "max abs diff", "max rel diff", "mismatches",
                                          "worst example"], rows) if rows else "(nothing to compare)")
            dec = agg["decomposition"]
            drows = [[name, num(d["norm_mean"]), num(d["share_mean"]), num(d["energy_mean"])]
                     for name, d in dec.items()]
            share = agg.get("encoder_null_share_mean")
            parts.append(f"\nrecovery-path decomposition (mode {mode}, top-k {self.top_k}; "
                         f"encoder-null share of delta {num(share)}):")
            parts.append(markdown_table(["component", "mean norm", "mean share of norm(delta)",
                                          "mean energy (share^2)"], drows) if drows else "(no examples)")
            parts.append("")
        return "\n".join(parts) if parts else "(no valid, evaluated examples to analyze)"


# --------------------------------------------------------------------------------------------
# loading the site from config.json


def _delta_clamp(config: Mapping[str, Any]) -> dict[str, Any]:
    clamps = config.get("clamp")
    if not isinstance(clamps, list) or not clamps:
        raise AnalysisError("config.json has no clamp list (\"clamp\": [{hook_name, features, ...}])")
    name = config.get("delta_site") or clamps[0].get("hook_name")
    for c in clamps:
        if isinstance(c, Mapping) and c.get("hook_name") == name:
            return dict(c)
    raise AnalysisError(f"delta site {name!r} is not among the clamped sites "
                        f"{[c.get('hook_name') for c in clamps if isinstance(c, Mapping)]}")


def _local_path_like(source: str) -> bool:
    """A source that can only mean a local directory (RELEASE/ID never starts like this)."""
    return source.startswith(("/", "./", "../", "~")) or source.startswith(os.sep)


def _load_delta_site(config: Mapping[str, Any], sae: Any, device: str) -> tuple[Site, torch.Tensor, dict]:
    entry = _delta_clamp(config)
    hook = entry["hook_name"]
    source = sae if sae is not None else entry.get("sae")
    if not source or source == "<in-memory SAE>":
        raise AnalysisError(
            f"config.json does not say where the SAE of {hook!r} came from (sae={entry.get('sae')!r}); "
            "pass it: --sae DIR or --sae RELEASE/ID"
        )
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not Path(text).expanduser().is_dir() and _local_path_like(text):
            raise AnalysisError(f"the SAE directory {text} of {hook!r} does not exist here; pass --sae DIR")
    site = load_site(source, hook_name=hook, device=device)
    features = site.check_features(torch.as_tensor(entry.get("features", []), dtype=torch.long))
    info = {"hook_name": hook, "sae": site.source or str(source), "n_features": int(features.numel()),
            "architecture": site.architecture, "d_in": site.d_in, "d_sae": site.d_sae}
    if "center_input" in entry:  # recorded by the run (preferred)
        site.center_input = bool(entry["center_input"])
        info["center_input"] = {"value": site.center_input, "from": "config"}
    else:
        info["center_input"] = {"value": site.center_input, "from": "SAE default"}
    return site, features, info


def _settle_centering(site: Site, features: torch.Tensor, h_def: torch.Tensor, z_def: torch.Tensor,
                      info: dict) -> None:
    """Without a recorded convention, an SAE that wants centred input is ambiguous (the
    TransformerLens backend may have centred the weights already): pick the convention that
    reproduces the saved z_def."""
    if info["center_input"]["from"] != "SAE default" or not site.center_input:
        return
    idx = features.to(site.sae.W_dec.device)

    def err(center: bool) -> float:
        site.center_input = center
        z = site.encode(h_def.to(site.sae.W_dec.device))[..., idx].cpu().double()
        return float((z - z_def.double()).abs().max()) if z.numel() else 0.0

    with torch.no_grad():
        with_c, without_c = err(True), err(False)
    site.center_input = with_c <= without_c
    if not site.center_input:
        info["center_input"] = {"value": False, "from": "saved z_def (the backend centred the weights)"}


# --------------------------------------------------------------------------------------------
# the analysis


def _h_rec(h_def: torch.Tensor, delta: torch.Tensor, *, reclamp: bool, model_dtype: torch.dtype) -> torch.Tensor:
    """The residual the run evaluated (recovery.recover_batch): h_def + delta, rounded to the
    model's dtype as the forward pass did unless the clamp was re-applied (then float32)."""
    h = h_def.float() + delta.float()
    if not reclamp and model_dtype not in (torch.float32, torch.float64):
        h = h.to(model_dtype).float()
    return h


def _model_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = str((config.get("model") or {}).get("dtype") or "float32").replace("torch.", "")
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def _aggregate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {}
    for ex in examples:
        for name, c in ex["checks"].items():
            agg = checks.setdefault(name, {"n": 0, "max_abs": 0.0, "max_rel": 0.0, "n_mismatch": 0,
                                           "worst_example": None})
            agg["n"] += 1
            if c["abs"] > agg["max_abs"]:
                agg["max_abs"] = c["abs"]
                agg["worst_example"] = ex["example_id"]
            agg["max_rel"] = max(agg["max_rel"], c["rel"])
            agg["n_mismatch"] += 0 if c["ok"] else 1
    dec: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        vals = [ex["decomposition"] for ex in examples]
        dec[name] = {
            "norm_mean": _mean([d["norms"][name] for d in vals]),
            "share_mean": _mean([d["shares"][name] for d in vals]),
            "energy_mean": _mean([d["energy"][name] for d in vals]),
        }
    shares = [ex["encoder_null_share"] for ex in examples if ex["encoder_null_share"] is not None]
    return {
        "n": len(examples),
        "checks": checks,
        "encoder_null_share_mean": _mean(shares),
        "encoder_null_share_min": min(shares) if shares else None,
        "decomposition": dec,
        "n_changed_mean": _mean([ex["decomposition"]["n_changed"] for ex in examples]),
    }


def _mean(values: list[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def _work(run: RunDirectory, result: AnalysisResult, d_in: int) -> list[tuple[dict, dict]]:
    """(record, tensors) of every valid, evaluated example; what is missing goes to problems."""
    work = []
    for rec in run.records():
        eid, mode = rec["example_id"], rec["mode"]
        if rec.get("valid") is not True:
            continue
        if rec.get("failed") is True or rec.get("recovered") is None:
            result.skipped.append({"example_id": eid, "mode": mode,
                                   "reason": rec.get("error") or "no outcome recorded"})
            continue
        try:
            t = run.load_tensors(mode, eid)
        except RunDirectoryError as e:
            result.problems.append(str(e))
            continue
        missing = [k for k in ("delta", "h_def") if k not in t]
        if missing:
            result.problems.append(f"tensors of (example_id={eid!r}, mode={mode!r}) lack {missing}")
            continue
        h_def, delta = t["h_def"], t["delta"]
        if h_def.shape != delta.shape or h_def.ndim != 2 or h_def.shape[-1] != d_in:
            result.problems.append(f"(example_id={eid!r}, mode={mode!r}): h_def {tuple(h_def.shape)} and "
                                   f"delta {tuple(delta.shape)} must both be (rows, d_in={d_in})")
            continue
        work.append((rec, t))
    return work


def analyze_run(run_dir: str | os.PathLike[str], *, sae: Any = None, device: str = "cpu",
                atol: float = 1e-5, rtol: float | None = None,
                top_k: int = DEFAULT_TOP_K) -> AnalysisResult:
    """Recompute every per-example metric of a saved run from its tensors and compare.

    For each record of a valid, non-failed example: z_def = E_S(h_def), z_rec = E_S(h_rec)
    with h_rec = h_def + delta, then :func:`saerecover.metrics.example_metrics` (``recovered``
    from the record), compared with the recorded values and the saved z_def / z_rec; plus the
    encoder-null share of delta and the recovery-path decomposition (:func:`decompose`).
    sae: overrides the config's SAE source of the delta site (a local directory, RELEASE/ID
    or an ``sae_lens.SAE``). rtol defaults to atol. Nothing is written; see
    :meth:`AnalysisResult.write`. Never loads the model.
    """
    rtol = atol if rtol is None else rtol
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    run = open_run(run_dir)
    config = run.config
    site, features, info = _load_delta_site(config, sae, device)
    rcfg = config.get("recovery") or {}
    eta = float(rcfg.get("eta", 0.0) or 0.0)
    reclamp = bool(rcfg.get("reclamp", False))
    model_dtype = _model_dtype(config)
    result = AnalysisResult(run_dir=run.path, site=info, atol=float(atol), rtol=float(rtol), top_k=int(top_k))
    if not (run.path / "summary.json").is_file():
        result.notes.append("summary.json is missing: the run is unfinished; analyzed the records so far")

    work = _work(run, result, site.d_in)
    first = next((t for _, t in work if "z_def" in t), None)
    if first is not None:
        _settle_centering(site, features, first["h_def"].float(), first["z_def"], info)
    a = site.encoder_columns(features)
    projector = linalg.EncoderNullProjector(a, rcond=rcfg.get("rcond")) if features.numel() else None
    dev = site.sae.W_dec.device

    by_mode: dict[str, list[dict[str, Any]]] = {}
    for rec, t in work:
        h_def, delta = t["h_def"].float(), t["delta"].float()
        h_rec = _h_rec(h_def, delta, reclamp=reclamp, model_dtype=model_dtype)
        feats = clamped_features(site, features, h_def.to(dev), h_rec.to(dev))
        metrics = example_metrics(site=site, features=features, feats=feats, delta_rows=delta.to(dev),
                                  h_def_rows=h_def.to(dev), a=a, recovered=bool(rec["recovered"]), eta=eta)
        checks: dict[str, dict[str, Any]] = {}
        for name, value in metrics.items():
            if name in rec:  # an older record may lack a metric
                checks[name] = {"recorded": rec[name], "recomputed": value,
                                **compare_value(rec[name], value, atol=atol, rtol=rtol)}
        for name in TENSOR_CHECKS:
            if name in t:
                checks[name] = _tensor_diff(t[name].float(), getattr(feats, name).cpu(), atol=atol, rtol=rtol)
        null_share = None
        if projector is not None and delta.numel():
            kept = torch.as_tensor(projector.apply(delta.contiguous()))
            null_share = float(kept.double().norm()) / (float(delta.double().norm()) + EPS)
        dec = decompose(site, features, h_def, delta, top_k=top_k)
        by_mode.setdefault(rec["mode"], []).append({
            "example_id": rec["example_id"],
            "mode": rec["mode"],
            "rows": int(h_def.shape[0]),
            "recovered": bool(rec["recovered"]),
            "checks": checks,
            "encoder_null_share": null_share,
            "decomposition": {"norms": dec["norms"], "shares": dec["shares"], "energy": dec["energy"],
                              "n_changed": dec["n_changed"],
                              "topk_features": [int(i) for i in dec["topk_features"].tolist()]},
        })
    modes = config.get("modes") if isinstance(config.get("modes"), list) else []
    for mode in [*modes, *[m for m in by_mode if m not in modes]]:
        exs = by_mode.get(mode, [])
        result.examples.extend(exs)
        result.modes[mode] = _aggregate(exs)
    if not result.examples:
        result.notes.append("no valid, evaluated examples: nothing was recomputed")
    return result
