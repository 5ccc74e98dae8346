"""Every command's option defaults, in one place.

The recovery options (steps, lr, budget, optimizer, positions, penalties, seed, ...) take
:class:`~saerecover.core.config.RecoveryConfig`'s field defaults (the paper's IOI setting); a task
whose recovery really differs says so in a named preset (``*_RECOVERY``); the model options are
declared once (:data:`MODEL`); the toy world's settings are presets on top (``TOY_*``,
:func:`toy_ioi`). A command resolves :func:`defaults` < toy preset (``--toy``) < config file <
flags given (cli.resolve). ``--protocol reference`` puts the paper's reference-code choices
(saerecover.core.protocol) between the defaults and the toy preset: defaults < protocol preset <
toy preset < config file < flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from saerecover.core import protocol as protocols
from saerecover.core.config import DRIFT_PENALTIES, PHI_POSITIONS, RecoveryConfig

__all__ = [
    "ANALYZE", "ATTRIBUTE", "CHOICES", "DEMO_OUT", "IOI", "MODEL", "MODES", "POSITIVE_TASK_INTS", "REFUSAL",
    "REFUSAL_BY_WORLD", "SWEEP_GRIDS", "SWEEP_IOI", "SWEEP_UNLEARNING", "TOY_HOOKS", "TOY_TPP", "TOY_UNLEARNING",
    "PROTOCOL_SCOPES", "TPP", "TRAIN_SAE", "UNLEARNING", "defaults", "recovery", "toy_ioi",
]

_CONFIG: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RecoveryConfig)}


def recovery(names: str, **preset: Any) -> dict[str, Any]:
    """RecoveryConfig's defaults of the options ``names`` (space-separated, in this order), with a
    task's ``preset`` values in their place."""
    keys = names.split()
    stray = sorted(set(preset) - set(keys))
    if stray:
        raise KeyError(f"preset options {stray} are not among {keys}")
    return {k: preset.get(k, _CONFIG[k]) for k in keys}


#: The options every run command's delta search takes, in flag order.
STEP = "steps lr budget budget_rel optimizer positions"
#: The model a run command loads: HF hub name or directory, its SAE, the site, where and how.
MODEL: dict[str, Any] = {"model": None, "sae": None, "hook": None, "backend": "hf", "device": None, "dtype": None}
#: Default projection modes of the single-site commands.
MODES = "none,encoder"
#: Options that take one of a few words (a config file must use them too).
CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": protocols.PROTOCOLS,
    "backend": ("hf", "tlens"),
    "dtype": ("float32", "bfloat16", "float16", "float64"),
    "clamp_mode": ("set", "multiply", "zero"),
    "clamp_where": ("all", "active"),
    "optimizer": ("adam", "sgd"),
    "positions": ("answer", "all", "prompt"),
    "dataset": ("bias_in_bios", "amazon_reviews", "file", "toy"),
    "loss": ("logit", "bce", "margin", "ce"),
    "reduce": ("max", "mean"),
    "success": ("margin", "argmax"),
    "retain_rule": ("at_most", "below"),
    "prompt_format": ("wmdp", "reference", "toy"),
    "probe_trainer": ("saerecover", "saebench"),
    "ioi_prompts": ("saerecover", "reference", "toy"),
    "forget_relation": ("capital", "color", "inventor"),
    "drift_penalty": DRIFT_PENALTIES,
    "phi_positions": PHI_POSITIONS,
    # run refusal (tasks.refusal: features.CLAMPS, judge.MATCH_RULES, task.JUDGES, task.GENERATION_DELTAS)
    "clamp": ("mean", "multiply"),
    "match": ("opening", "substring", "case_sensitive"),
    "judge": ("ours", "reference"),
    "generation_deltas": ("prompt", "all"),
}

# ------------------------------------------------------------------------- where tasks differ
#: TPP: delta acts at every position (the probe reads them all).
TPP_RECOVERY: dict[str, Any] = {"positions": "all"}
#: Unlearning: delta at every position, more and smaller steps.
UNLEARNING_RECOVERY: dict[str, Any] = {"steps": 150, "lr": 0.08, "positions": "all"}
#: Refusal: delta on the prompt, a larger step and budget.
REFUSAL_RECOVERY: dict[str, Any] = {"lr": 0.2, "budget": 40.0, "positions": "prompt"}

# ------------------------------------------------------------------------- the commands
#: ``run ioi``: the paper's IOI setting (GPT-2 small, gpt2-small-res-jb).
IOI: dict[str, Any] = {
    "protocol": protocols.DEFAULT,
    **MODEL, "model": "gpt2", "sae": "gpt2-small-res-jb/blocks.4.hook_resid_pre",
    "n": 64, "patterns": "BABA", "ioi_prompts": "saerecover", "top_k": 64, "features": None,
    "clamp_mode": "set", "clamp_value": -5.0, "clamp_where": "active", "modes": MODES,
    **recovery(f"{STEP} shared_delta reclamp early_stop lambda_act lambda_decode lambda_delta max_drift"),
    "batch_size": 32, **recovery("seed"), "out": None,
}
#: ``run tpp``: SAEBench TPP on Bias in Bios.
TPP: dict[str, Any] = {
    "protocol": protocols.DEFAULT,
    **MODEL, "dataset": "bias_in_bios", "data": None, "test_data": None, "text_column": None,
    "label_column": None, "data_classes": None, "classes": None, "n_train": 2000, "n_test": 500,
    "context_length": 128, "top_n": 10,
    "probe_trainer": "saerecover", "probe_epochs": 20, "probe_lr": 1e-3, "probe_batch_size": 16, "probe_l1": 1e-3,
    "loss": "logit",
    "modes": MODES, **recovery(STEP, **TPP_RECOVERY), "batch_size": 32, **recovery("seed"), "out": None,
}
#: ``run unlearning``: WMDP-style, strict 24-order protocol.
UNLEARNING: dict[str, Any] = {
    "protocol": protocols.DEFAULT,
    **MODEL, "questions": None, "forget_corpus": None, "retain_corpus": None, "corpus_column": "text",
    "limit": 0, "forget_relation": "inventor", "prompt_format": "wmdp", "top_n": 20, "retain_threshold": 0.01,
    "retain_rule": "at_most", "clamp_value": -20.0, "loss": "margin", "reduce": "max", "success": "margin",
    "strict": True, "features": None,
    "modes": MODES, **recovery(STEP, **UNLEARNING_RECOVERY), "batch_size": 32, **recovery("seed"), "out": None,
}
#: ``sweep``: the grids, on top of the swept task's options.
SWEEP_GRIDS: dict[str, Any] = {"budgets": "1,2,5,10,20", "ks": "4,8,16,32"}
SWEEP_IOI: dict[str, Any] = {**IOI, **SWEEP_GRIDS}
SWEEP_UNLEARNING: dict[str, Any] = {**UNLEARNING, **SWEEP_GRIDS}
#: ``train-sae``: an SAE width 4096, BatchTopK k 56 on ~32k tokens of the model's own text
#: (docs/real_model.md has what it reaches on SmolLM2-135M-Instruct).
TRAIN_SAE: dict[str, Any] = {
    "architecture": "batchtopk", "width": 4096, "k": 56.0, "l1": 5.0, "tokens": 400_000, "batch_size": 1024,
    "lr": 1e-3, "samples_per_opening": 6, "new_tokens": 80, "answer_tokens": 64, "n_ioi": 256,
    "max_norm_ratio": 10.0, "held_out": 0.1, "seed": 0,
}
#: ``run refusal``. model None: the shipped toy world (its SAEs at ``hooks``, its own request
#: format, corpus requests).
REFUSAL: dict[str, Any] = {
    "protocol": protocols.DEFAULT,
    "model": None, "saes": None, "hooks": None, **{k: MODEL[k] for k in ("backend", "device", "dtype")},
    "requests": None, "column": None, "limit": None, "contrast": None, "contrast_column": None,
    "n": 24, "n_contrast": 48, "min_contrast": 5, "top_k": 16, "features": None, "clamp": "mean", "clamp_scale": 1.0,
    "clamp_multiplier": 3.0, "contrast_positions": None,
    "template": None, "system_prompt": None, "max_new_tokens": None, "lists": "gcg", "match": "opening", "strict": True,
    "judge": "ours",
    "generation_deltas": "prompt", "prefix_weight": 2.0,
    "prefix_tokens": 4, "discourage_refusal": 0.0, "store_generations": False,
    "modes": "none,encoder,jacobian,sketch,suffix", "delta_site": None,
    **recovery(f"{STEP} reclamp lambda_act drift_penalty penalty_after_projection drift_correction_steps "
               "drift_correction_lr lambda_delta max_drift checkpoint_every checkpoint_after_update "
               "checkpoint_fallback_weight sketch_probes anchor_steps anchor_lr anchor_budget response_rows "
               "phi_positions", **REFUSAL_RECOVERY),
    "suffix_tokens": 8, "suffix_lr": None, "suffix_budget": None,
    "batch_size": 16, **recovery("seed"), "attribute": False, "top_k_attribution": 10, "out": None,
}
#: ``run refusal``'s options whose default (None above) depends on the world: the toy world's
#: responses are short and its contrast is read at the last prompt token.
REFUSAL_BY_WORLD: dict[str, dict[str, Any]] = {
    "toy": {"max_new_tokens": 16, "contrast_positions": "last"},
    "model": {"max_new_tokens": 64, "contrast_positions": "prompt"},
}
#: ``attribute RUN_DIR``.
ATTRIBUTE: dict[str, Any] = {"top_k": 10, "batch_size": 16}
#: ``analyze RUN_DIR``; top_k is saerecover.core.decomposition.DEFAULT_TOP_K, restated because
#: that module imports torch (a test keeps the two equal).
ANALYZE: dict[str, Any] = {"atol": 1e-5, "rtol": None, "top_k": 10, "device": "cpu"}

# ------------------------------------------------------------------------- the toy world
#: ``demo``'s run directory.
DEMO_OUT = "runs/demo"


def toy_ioi() -> dict[str, Any]:
    """The toy world's IOI setting (toy.DEMO_OPTIONS), of ``demo`` and ``sweep --task ioi --toy``.
    saerecover.toy loads the models layer (torch), so it is read when such a command runs."""
    from saerecover.toy import DEMO_OPTIONS

    return dict(DEMO_OPTIONS)


#: ``run tpp --toy``: the toy world's topic sentences at layer 1.
TOY_TPP: dict[str, Any] = {"hook": "blocks.1.hook_resid_post", "dataset": "toy", "n_train": 40, "n_test": 20,
                           "top_n": 16, "probe_lr": 1e-2, "budget": 1.0}
#: ``run unlearning --toy``: one toy fact family is the forget set, the others the retain set.
TOY_UNLEARNING: dict[str, Any] = {"hook": "blocks.1.hook_resid_post", "prompt_format": "toy", "top_n": 16,
                                  "retain_threshold": 0.01, "clamp_value": -20.0, "budget": 10.0}
#: ``run refusal`` on the toy world: its sites when --saes is not given.
TOY_HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")

#: Integer options of the --toy commands (tpp, unlearning, sweep) that must be >= 1.
POSITIVE_TASK_INTS = ("top_n", "n_train", "n_test", "context_length", "probe_epochs", "probe_batch_size", "steps")

#: Each command's defaults and its --toy preset (a function: the toy IOI one is read when needed).
_COMMANDS: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]] | None]] = {
    "run ioi": (IOI, toy_ioi),
    "run tpp": (TPP, lambda: TOY_TPP),
    "run unlearning": (UNLEARNING, lambda: TOY_UNLEARNING),
    "sweep ioi": (SWEEP_IOI, lambda: {k: v for k, v in toy_ioi().items() if k not in ("model", "sae", "budget_rel")}),
    "sweep unlearning": (SWEEP_UNLEARNING, lambda: TOY_UNLEARNING),
    "run refusal": (REFUSAL, None),
    "attribute": (ATTRIBUTE, None),
    "analyze": (ANALYZE, None),
}


#: The protocol scope (saerecover.core.protocol) of each command that takes ``--protocol``.
PROTOCOL_SCOPES: dict[str, str] = {
    "run ioi": "ioi", "run tpp": "tpp", "run unlearning": "unlearning", "run refusal": "refusal",
    "sweep ioi": "ioi", "sweep unlearning": "unlearning",
}


def defaults(command: str, *, toy: bool = False, protocol: str = protocols.DEFAULT) -> dict[str, Any]:
    """A fresh dict of ``command``'s defaults ("run tpp", "sweep unlearning", ...): its own, then
    ``protocol``'s preset (its choices of the command's scope), then its toy preset when ``toy``;
    "demo" is ``run ioi`` in the toy world's IOI setting."""
    if command == "demo":
        return {**IOI, **toy_ioi(), "out": DEMO_OUT}
    base, toy_preset = _COMMANDS[command]
    scope = PROTOCOL_SCOPES.get(command)
    chosen = {k: v for k, v in protocols.preset(scope, protocol).items() if k in base} if scope else {}
    if scope:
        chosen["protocol"] = protocols.check_protocol(protocol)
    return {**base, **chosen, **(toy_preset() if toy and toy_preset else {})}
