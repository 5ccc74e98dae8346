"""Two protocols, one engine: ``saerecover`` (our choices, the defaults) and ``reference`` (what the
paper's released research code did), choice by choice.

Each :class:`Choice` is one option of the command line, a config file and the API (its ``key``),
with our value, the reference code's value, one line of what it is, and where the reference code
does it (file:line in Mingyuee88/sae-post-intervention-recovery at :data:`REFERENCE_COMMIT`, or in
the code it runs). Choices are grouped by scope: ``recovery`` (the delta search, every task) and
one scope per task. A protocol's values are a preset: ``defaults < protocol < toy world preset <
config file < flags`` (docs/protocols.md says why the toy world's scale presets sit above it), and
every choice stays its own option, so protocols can be mixed. Runs record ``{"name", "choices"}``
in config.json (:func:`record`).

Adding a choice is one :class:`Choice` line in its scope's table below, plus the option itself.
Choices whose key is a :class:`~saerecover.core.config.RecoveryConfig` field are applied by
``recover(..., protocol=...)`` too; the others by the task's runner or command.

This module imports nothing heavy (the command line reads it while it parses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CHOICES", "DEFAULT", "PROTOCOLS", "REFERENCE_COMMIT", "Choice", "apply", "check_protocol", "choices",
           "name_of", "preset", "record", "resolve", "values"]

#: The protocol names: ours (the defaults) and the paper's released code.
PROTOCOLS: tuple[str, ...] = ("saerecover", "reference")
DEFAULT = "saerecover"
#: The version of the reference code the table cites.
REFERENCE_COMMIT = "Mingyuee88/sae-post-intervention-recovery@5a80dfca7bff"


@dataclass(frozen=True)
class Choice:
    """One protocol choice: option ``key`` is ``ours`` under saerecover and ``reference`` under the
    reference protocol; ``what`` says what it is in one line, ``source`` where the reference code
    does it."""

    key: str
    ours: Any
    reference: Any
    what: str
    source: str

    def value(self, protocol: str) -> Any:
        return self.reference if check_protocol(protocol) == "reference" else self.ours


# ----------------------------------------------------------------------------------------------
# the tables, one per scope

#: The delta search, shared by every task (drift penalty and checkpoint choices go here).
RECOVERY: tuple[Choice, ...] = (
)

IOI: tuple[Choice, ...] = (
    Choice("shared_delta", False, True,
           "one delta per example, or ONE (1, d) vector for all prompts on their mean logit difference",
           "src/sae_bench/recovery_core/core.py:213-217, 311-321; experiments/ioi/ioi_recovery.py:98-106, 292-293"),
    Choice("ioi_prompts", "saerecover", "reference",
           "our 4 templates and 32 names, or Easy-Transformer's first BABA template, 99 names and draws",
           "experiments/ioi/ioi_recovery.py:28-48 (IOIDataset(prompt_type='BABA', N=64, nb_templates=1), seed 0)"),
)

TPP: tuple[Choice, ...] = (
    Choice("top_n", 10, 500, "latents zero-ablated per target class",
           "results/sanitized/scan_best_targets.csv (n = 500 for every dataset's best target; inferred)"),
    Choice("probe_trainer", "saerecover", "saebench",
           "probes: Adam, zero init, last epoch, pooled negatives; or SAEBench's AdamW (wd 0.01), nn.Linear "
           "init, best-test-accuracy epoch, equal-share negatives",
           "SAEBench evals/sparse_probing/probe_training.py:24-88, 235-305; evals/scr_and_tpp/main.py:49-135"),
)

UNLEARNING: tuple[Choice, ...] = (
    Choice("positions", "all", "answer", "rows where delta acts: every token, or the answer (last) token only",
           "src/sae_bench/recovery_core/core.py:213-217 (one (1, d) row at seq_len - 1)"),
    Choice("reduce", "max", "mean", "the margin loss: correct letter minus the max / mean of the other three",
           "src/sae_bench/recovery_core/core.py:40-47 (choice_margin)"),
    Choice("success", "margin", "argmax", "B holds iff the loss's margin is > 0, or iff the correct letter wins",
           "experiments/unlearning/permutation_seqwide.py:161, 169, 260-267 (greedy_choice_letter == gold)"),
    Choice("prompt_format", "wmdp", "reference",
           "header line and single newlines (lm-eval style), or no header and blank lines around the options",
           "experiments/unlearning/permutation_seqwide.py:34-42 (format_prompt)"),
    Choice("retain_rule", "at_most", "below", "features kept: retain frequency <= or < the threshold",
           "SAEBench evals/unlearning/utils/feature_activation.py:106-117 (get_top_features), called at "
           "experiments/unlearning/recovery_unlearning_choice_only_seqwide_act.py:141-166"),
)

#: The refusal task's choices (docs/refusal.md has the full table, with what is not reproduced).
#: v4 = experiments/refusal/baseline_refusal_sae_recovery_crosslayer_v4.py, base =
#: experiments/refusal/baseline_refusal_sae_recovery.py, hb =
#: scripts/run_harmbench_strict_valid_safe.py.
REFUSAL: tuple[Choice, ...] = (
    Choice("clamp", "mean", "multiply", "each feature set to its mean on refused requests, or multiplied (x 3)",
           "base 849-876 (clamp_sae_safe(val=3.0, multiply=True)); v4 655; hb 109"),
    Choice("judge", "ours", "reference", "behavior B: our strict opening categories, or the reference's "
           "substring judge with its clamped-response rule", "v4 806, 809, 841; base 541-564, 1131-1148"),
    Choice("delta_site", None, "all", "delta at the first clamped site, or at every clamped layer",
           "v4 713-744, 746-788"),
    Choice("anchor_steps", 0, 30, "a first stage on the last prompt token, then fixed (its steps)",
           "v4 674, 713-744; hb 139-141"),
    Choice("anchor_budget", None, 40.0, "the first stage's own budget (none: the run's)", "hb 139-141"),
    Choice("positions", "prompt", "response", "the second stage's rows: every prompt row, or response rows",
           "v4 668-674, 746-788; hb 131"),
    Choice("response_rows", None, 48, "response rows the delta covers (none: every one)", "hb 133"),
    Choice("steps", 100, 120, "optimisation steps of the (second) stage", "hb 121"),
    Choice("lr", 0.2, 0.05, "its learning rate", "hb 122"),
    Choice("phi_positions", "from_delta", "response", "rows Phi covers: from the first delta row on, or the "
           "response rows only", "v4 246-266, 668-674"),
    Choice("lambda_act", 0.0, 200.0, "the drift penalty's weight", "hb 124; v4 543"),
    Choice("drift_penalty", "relative_l2", "relative_mse", "||Phi - Phi_def|| / ||Phi_def||, or the per-layer "
           "relative mean squared drift, mean over layers", "v4 354-382; hb 125-126"),
    Choice("penalty_after_projection", False, True, "the penalty's gradient before the projection (then "
           "projected), or added after it (jacobian and sketch)", "v4 545-556"),
    Choice("drift_correction_steps", 0, 5, "plain gradient steps on the penalty after every step "
           "(row-space modes)", "v4 561-599; hb 114-116"),
    Choice("max_drift", None, 0.03, "checkpoint threshold on Phi's relative drift (none: the last delta)",
           "v4 487-490; hb 129"),
    Choice("checkpoint_every", 1, 10, "checkpoint cadence (plus the first and last step)", "v4 613-616; hb 128"),
    Choice("checkpoint_after_update", False, True, "candidates measured before or after the step's update",
           "v4 463-514, 613-616"),
    Choice("checkpoint_fallback_weight", None, 80.0, "no candidate under the threshold: delta = 0, or the best "
           "score - 80 x drift", "v4 487-503; hb 130"),
    Choice("sketch_probes", 4, 8, "random probes of the sketch mode (plus the drift probe)", "v4 107-149; hb 112-113"),
)

#: Every scope's table.
CHOICES: dict[str, tuple[Choice, ...]] = {
    "recovery": RECOVERY,
    "ioi": IOI,
    "tpp": TPP,
    "unlearning": UNLEARNING,
    "refusal": REFUSAL,
}


# ----------------------------------------------------------------------------------------------
# reading the tables


def check_protocol(name: Any) -> str:
    """``name`` if it is a protocol; ValueError naming the valid ones otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return str(name)


def choices(scope: str | None) -> tuple[Choice, ...]:
    """The choices of a task ``scope`` ("ioi", "tpp", "unlearning", "refusal"): the recovery
    choices, then the task's own; ``None`` or "recovery": the recovery choices only."""
    if scope is not None and scope not in CHOICES:
        raise ValueError(f"unknown protocol scope {scope!r}; valid: {', '.join(CHOICES)}")
    own = CHOICES[scope] if scope not in (None, "recovery") else ()
    return RECOVERY + own


def values(scope: str | None, protocol: str) -> dict[str, Any]:
    """Every choice of ``scope`` under ``protocol``, ``{key: value}``."""
    check_protocol(protocol)
    return {c.key: c.value(protocol) for c in choices(scope)}


def preset(scope: str | None, protocol: str) -> dict[str, Any]:
    """What ``protocol`` sets on top of the defaults: nothing for saerecover (its values are the
    defaults), every choice of ``scope`` for reference."""
    return {} if check_protocol(protocol) == DEFAULT else values(scope, protocol)


def record(scope: str | None, protocol: str, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's ``protocol`` entry: the protocol's name and every choice of ``scope`` as it
    was resolved (``resolved[key]``, which flags and config files may have changed; a choice
    absent from ``resolved`` is left out)."""
    return {"name": check_protocol(protocol),
            "choices": {c.key: resolved[c.key] for c in choices(scope) if c.key in resolved}}


def name_of(protocol: str | Mapping[str, Any] | None) -> str:
    """The protocol's name, from a name, an entry ``{"name", "choices"}`` or None (saerecover)."""
    if isinstance(protocol, Mapping):
        return check_protocol(protocol.get("name"))
    return check_protocol(protocol if protocol is not None else DEFAULT)


def resolve(scope: str, protocol: str | Mapping[str, Any] | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every choice of ``scope``: ``given[key]`` where it is not None (a runner's explicit
    argument), else the protocol entry's own choice, else the protocol's value."""
    entry = dict(protocol.get("choices") or {}) if isinstance(protocol, Mapping) else {}
    out = {**values(scope, name_of(protocol)), **entry}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def apply(cfg: Any, protocol: str | Mapping[str, Any] | None, scope: str | None,
          explicit: Collection[str] = ()) -> dict[str, Any]:
    """Set ``protocol``'s choices of ``scope`` that are fields of the recovery config ``cfg`` (a
    RecoveryConfig, changed in place) where the caller did not choose: not in ``explicit`` (the
    keywords given), not in the protocol entry's own ``choices``, and still at the field's default.
    Returns config.json's ``protocol`` entry: the name, the entry's choices, and every
    ``cfg``-level choice of ``scope`` as it now is.

    ``protocol``: a name, or an entry ``{"name", "choices"}`` resolved by a command or a task's
    runner (its choices are taken as they are); None is saerecover."""
    name = name_of(protocol)
    given = dict(protocol.get("choices") or {}) if isinstance(protocol, Mapping) else {}
    fields = {f.name: f.default for f in dataclasses.fields(cfg)}
    own = [c for c in choices(scope) if c.key in fields]
    for c in own:
        if c.key not in explicit and c.key not in given and getattr(cfg, c.key) == fields[c.key]:
            setattr(cfg, c.key, c.value(name))
    return {"name": name, "choices": {**given, **{c.key: getattr(cfg, c.key) for c in own}}}
