"""The unlearning study: forget-vs-retain feature selection, the negative clamp where active, the
strict 24-order filter, and recovery of the forgotten answers (PAPER_NOTES, WMDP-Bio row)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saerecover.core import protocol as protocols
from saerecover.core.clamp import Clamp
from saerecover.core.config import RecoveryConfig
from saerecover.data.questions import MCQuestion
from saerecover.experiments.pipeline import recover
from saerecover.report.unlearning import unlearning_table
from saerecover.runs import atomic_write_json
from saerecover.tasks.unlearning import (
    FORMATS,
    PERMUTATIONS,
    MCFormat,
    MultipleChoice,
    firing_frequency,
    select_by_frequency,
    strict_filter,
)

#: The paper's unlearning recovery setting (150 Adam steps, lr 0.08, budget 20), delta on every row.
UNLEARNING_RECOVERY: dict[str, Any] = {"steps": 150, "lr": 0.08, "budget": 20.0, "positions": "all"}
_FIELDS = set(RecoveryConfig.__dataclass_fields__)


@dataclass
class UnlearningResult:
    run: Any  # RunResult
    task: MultipleChoice
    features: torch.Tensor
    forget_frequency: torch.Tensor
    retain_frequency: torch.Tensor
    info: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        return self.run.summary

    @property
    def path(self) -> Path | None:
        return self.run.path

    def table(self) -> str:
        return unlearning_table(self.info, self.run.summary)


@dataclass
class UnlearningSetup:
    """The strict-protocol task, the forget/retain firing frequencies and the clamp."""

    task: MultipleChoice
    clamp: Any  # Clamp
    features: torch.Tensor
    forget_frequency: torch.Tensor
    retain_frequency: torch.Tensor
    selection: dict[str, Any]
    #: config.json's protocol entry: the protocol's name and every unlearning choice as resolved
    protocol: dict[str, Any] = field(default_factory=lambda: {"name": protocols.DEFAULT, "choices": {}})

    def clamp_top(self, k: int) -> Any:
        """The same clamp on the top-``k`` features by forget frequency (a feature-set sweep)."""
        sc = self.clamp.site_clamps[0]
        feats = select_by_frequency(self.forget_frequency, self.retain_frequency, top_n=k,
                                    retain_threshold=self.selection["retain_threshold"],
                                    rule=self.selection.get("retain_rule", "at_most"))
        return Clamp({sc.site: feats}, value=float(sc.value), mode=sc.mode, where=sc.where)


def setup_unlearning(model: Any, site: Any, questions: Sequence[MCQuestion], forget_texts: Sequence[str],
                     retain_texts: Sequence[str], *, fmt: MCFormat | None = None, top_n: int = 20,
                     retain_threshold: float = 0.01, clamp_value: float = -20.0, loss: str = "margin",
                     reduce: str | None = None, success: str | None = None, retain_rule: str | None = None,
                     strict: bool = True, permutations: Sequence[tuple[int, ...]] = PERMUTATIONS,
                     features: Sequence[int] | None = None, batch_size: int = 32, name: str = "wmdp-bio",
                     protocol: str | Mapping[str, Any] | None = None) -> UnlearningSetup:
    """Build the task (strict filter on the base model), select the features by forget-vs-retain
    firing frequency (or take ``features``) and clamp them to ``clamp_value`` where active.

    fmt, reduce, success, retain_rule: None takes ``protocol``'s choice (saerecover: the
    "wmdp" format, reduce "max", success "margin", retain "at_most"; reference: the reference
    code's format, "mean", "argmax", "below"; saerecover.core.protocol).
    """
    if clamp_value >= 0:
        raise ValueError(f"clamp_value must be negative (features are pushed below zero where active), "
                         f"got {clamp_value}")
    chosen = protocols.resolve("unlearning", protocol, {
        "prompt_format": fmt.name if fmt is not None else None, "reduce": reduce, "success": success,
        "retain_rule": retain_rule})
    if fmt is None:
        fmt = FORMATS[chosen["prompt_format"]]
    task = MultipleChoice(model.tokenizer, list(questions), fmt, permutations, loss, chosen["reduce"], name,
                          success=chosen["success"])
    if strict:
        task = strict_filter(model, task, batch_size=batch_size)
    ff = firing_frequency(model, site, forget_texts, batch_size=batch_size)
    rf = firing_frequency(model, site, retain_texts, batch_size=batch_size)
    if features is None:
        feats = select_by_frequency(ff, rf, top_n=top_n, retain_threshold=retain_threshold,
                                    rule=chosen["retain_rule"])
    else:
        feats = site.check_features(torch.as_tensor(list(features), dtype=torch.long))
    clamp = Clamp({site: feats}, value=clamp_value, mode="set", where="active")
    selection = {"top_n": top_n, "retain_threshold": retain_threshold, "retain_rule": chosen["retain_rule"],
                 "clamp_value": clamp_value, "features": feats.tolist(), "n_forget_texts": len(forget_texts),
                 "n_retain_texts": len(retain_texts), "explicit_features": features is not None}
    return UnlearningSetup(task=task, clamp=clamp, features=feats, forget_frequency=ff, retain_frequency=rf,
                           selection=selection, protocol={"name": protocols.name_of(protocol), "choices": chosen})


def run_unlearning(model: Any, site: Any, questions: Sequence[MCQuestion], forget_texts: Sequence[str],
                   retain_texts: Sequence[str], *, out: str | Path | None, fmt: MCFormat | None = None,
                   top_n: int = 20, retain_threshold: float = 0.01, clamp_value: float = -20.0,
                   projection: str | Sequence[str] = ("none", "encoder"), loss: str = "margin",
                   reduce: str | None = None, success: str | None = None, retain_rule: str | None = None,
                   strict: bool = True, permutations: Sequence[tuple[int, ...]] = PERMUTATIONS,
                   features: Sequence[int] | None = None, batch_size: int = 32, progress: bool = False,
                   overwrite: bool = False, report: bool = True, name: str = "wmdp-bio",
                   setup: UnlearningSetup | None = None, protocol: str | Mapping[str, Any] | None = None,
                   executor: Any = None, **overrides: Any) -> UnlearningResult:
    """Strict-protocol unlearning clamp and its recovery, written as one run directory ``out``
    (plus ``out/unlearning.json``: kept questions, selected features and their frequencies,
    valid flips per question).

    features: skip selection and clamp these. protocol: "saerecover" or "reference" (or a
    resolved entry): the choices of fmt, reduce, success, retain_rule (see
    :func:`setup_unlearning`) and of the rows delta acts on (saerecover: every token; reference:
    the answer token) that are not given. overrides: RecoveryConfig fields (defaults
    :data:`UNLEARNING_RECOVERY`, then the protocol's). executor: where the recovery runs
    (``recover``'s executor, docs/clusters.md).
    """
    st = setup or setup_unlearning(model, site, questions, forget_texts, retain_texts, fmt=fmt, top_n=top_n,
                                   retain_threshold=retain_threshold, clamp_value=clamp_value, loss=loss,
                                   reduce=reduce, success=success, retain_rule=retain_rule, strict=strict,
                                   permutations=permutations, features=features, batch_size=batch_size, name=name,
                                   protocol=protocol)
    chosen = st.protocol
    cfg = {**UNLEARNING_RECOVERY, **{k: v for k, v in chosen["choices"].items() if k in _FIELDS}, **overrides}
    res = recover(model, st.clamp, st.task, projection=projection, out=out, batch_size=batch_size,
                  progress=progress, overwrite=overwrite, report=report,
                  extra_config={"unlearning": st.selection}, protocol=chosen, executor=executor, **cfg)
    feats = st.features
    info = {
        "task": st.task.name,
        "hook_name": site.hook_name,
        "strict": st.task.info.get("strict"),
        "n_questions_kept": len(st.task.questions),
        "n_examples": len(st.task.examples()),
        "selection": {**st.selection, "forget_frequency": st.forget_frequency[feats].tolist(),
                      "retain_frequency": st.retain_frequency[feats].tolist()},
        "per_question": _per_question(res.records),
        "recovery": cfg,
        "protocol": chosen["name"],
    }
    if res.path is not None:
        atomic_write_json(Path(res.path) / "unlearning.json", info)
    return UnlearningResult(run=res, task=st.task, features=feats, forget_frequency=st.forget_frequency,
                            retain_frequency=st.retain_frequency, info=info)


def _per_question(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question: orders the clamp turned wrong (valid flips), and recovered ones per mode."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        qid = str(r["example_id"]).rsplit("-p", 1)[0]
        q = out.setdefault(qid, {"valid": set(), "recovered": {}})
        if r.get("valid"):
            q["valid"].add(r["example_id"])
            if r.get("recovered"):
                q["recovered"][r["mode"]] = q["recovered"].get(r["mode"], 0) + 1
    return {k: {"valid_flips": len(v["valid"]), "recovered": v["recovered"]} for k, v in sorted(out.items())}
