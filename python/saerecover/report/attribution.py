"""The attribution part of a run report, from RUN_DIR/attribution.json when ``saerecover
attribute`` (or ``run refusal --attribute``) wrote one: per mode, how many recovered examples
each recovery-path component recovers alone (replayed under the clamp; Wilson intervals), and
per example the replays that recover and its top non-clamped features."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.report.document import Features, Figure, Section, Table
from saerecover.report.format import NA, num, rate_ci

__all__ = ["ATTRIBUTION_FILE", "ATTRIBUTION_PLOT", "attribution_sections", "read_attribution"]

ATTRIBUTION_FILE = "attribution.json"
ATTRIBUTION_PLOT = "attribution.png"


def read_attribution(run_path: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/attribution.json, or None when there is none (or it is not a JSON object)."""
    path = Path(run_path) / ATTRIBUTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def attribution_sections(run_path: str | Path, neuronpedia_id: str | None = None,
                         plots_dir: str = "plots") -> list[Section]:
    """The report's "Recovery-path attribution" section (and its per-example table), or [] when
    the run has no attribution.json. neuronpedia_id: the delta site's SAE, for feature links."""
    data = read_attribution(run_path)
    if data is None:
        return []
    comps = [str(c) for c in data.get("components") or []]
    site, top_k = data.get("site", "?"), data.get("top_k", "?")
    blocks: list[Any] = [
        f"Each recovered delta at {site} is split into components (the full delta, the SAE-explained part, "
        "its clamped and non-clamped parts, the top-k non-clamped features, the top-k knockout and the SAE "
        f"residual; top-k = {top_k}), and each is replayed alone with the clamp active and judged as the run "
        "was. Decoder directions are not orthogonal, so the replay counts, not the norms, are the evidence "
        "for where recovery lives."]
    for mode, agg in (data.get("modes") or {}).items():
        n = agg.get("n", 0)
        rows = [[c, f"{v.get('recovered', NA)}/{n}", rate_ci(v.get("rate"), v.get("rate_ci95")),
                 num(v.get("norm_mean")), num(v.get("share_mean"))]
                for c, v in (agg.get("components") or {}).items()]
        blocks += [f"Mode {mode}: {n} recovered example(s) replayed.",
                   Table(["component", "recovers alone", "rate [95% Wilson]", "mean norm",
                          "mean share of norm(delta)"], rows)]
    if (Path(run_path) / plots_dir / ATTRIBUTION_PLOT).is_file():
        blocks.append(Figure(f"{plots_dir}/{ATTRIBUTION_PLOT}",
                             "Recovered examples whose replay of each component alone recovers, per mode."))
    for note in data.get("notes") or []:
        blocks.append(f"Note: {note}")
    sections = [Section("Recovery-path attribution", blocks)]
    examples = [e for e in data.get("examples") or [] if isinstance(e, Mapping)]
    if examples:
        rows = []
        for e in examples:
            replay = e.get("replay") or {}
            rows.append([str(e.get("example_id", "?")), str(e.get("mode", "?")),
                         ", ".join(c for c in comps if replay.get(c)) or "none",
                         Features(list(e.get("topk_features") or []), neuronpedia_id),
                         str(e.get("n_changed", NA)), num((e.get("shares") or {}).get("residual"))])
        sections.append(Section("Recovery paths per example", [
            "The components whose replay alone recovers each example, and its top-k non-clamped features by "
            "||dz_j|| (largest first).",
            Table(["example", "mode", "replays that recover", "top-k non-clamped features",
                   "non-clamped features moved", "residual share of norm(delta)"], rows)], level=3))
    return sections
