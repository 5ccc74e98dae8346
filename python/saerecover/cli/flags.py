"""The run commands' option flags, each defined once (:data:`FLAGS`), and the groups of them that
several commands share. A command lists its flags in order with :func:`add_flags` and overrides a
help text or choice list only where its meaning differs. Option flags default to None (store_true
flags too): the resolved defaults are cli.options', overridden by a config file, then by flags."""

from __future__ import annotations

import argparse
from typing import Any

from saerecover.cli.checks import budget_arg
from saerecover.cli.options import CHOICES, MODES, TPP, UNLEARNING
from saerecover.core.protocol import PROTOCOLS

__all__ = ["EXECUTOR_FLAGS", "FLAGS", "add_flags", "ioi_flags", "task_recovery_flags", "unlearning_flags",
           "world_flags"]

_RUN_DIR = "run directory (resumes if it exists with the same config)"

#: argparse keywords of every flag, by option name (the flag is ``--`` + the name with dashes).
FLAGS: dict[str, dict[str, Any]] = {
    # what to load
    "config": {"help": "YAML/TOML/JSON file with any of the options below (flags win)"},
    "toy": {"action": "store_true", "help": "use the shipped toy world (no download)"},
    "protocol": {"choices": list(PROTOCOLS),
                 "help": "saerecover: our choices; reference: the paper's released code, choice by choice "
                         "(docs/protocols.md; each choice is also its own option, and options given win)"},
    "model": {"help": "HF hub name or local directory"},
    "sae": {"help": "sae_lens RELEASE/ID or a local SAE directory"},
    "hook": {"help": "site hook name (default: the SAE's own hook_name)"},
    "backend": {"choices": list(CHOICES["backend"])},
    "device": {},
    "dtype": {"choices": list(CHOICES["dtype"])},
    # the task and the clamp
    "n": {"type": int, "help": "number of prompts"},
    "patterns": {"help": "IOI name orders: BABA, ABBA or BABA,ABBA"},
    "ioi_prompts": {"choices": list(CHOICES["ioi_prompts"]),
                    "help": "saerecover: our templates and names; reference: the paper's code's (Easy-Transformer's "
                            "BABA template, names and draws; GPT-2's tokenizer); toy: the toy world's own"},
    "top_k": {"type": int, "help": "features selected by attribution"},
    "features": {"help": "explicit comma-separated feature indices (skips selection)"},
    "clamp_mode": {"choices": list(CHOICES["clamp_mode"])},
    "clamp_value": {"type": float},
    "clamp_where": {"choices": list(CHOICES["clamp_where"])},
    # the delta search
    "modes": {},
    "steps": {"type": int},
    "lr": {"type": float},
    "budget": {"type": budget_arg, "help": "C4: ||delta||_F <= budget; a number with x (0.25x) is relative to the "
                                           "defended residual (as --budget-rel)"},
    "budget_rel": {"type": float, "help": "C4 relative: ||delta|| <= this x sqrt(rows) x the median norm of the "
                                          "defended residual's optimized rows, per example (overrides --budget)"},
    "shared_delta": {"action": argparse.BooleanOptionalAction, "default": None,
                     "help": "one delta vector for all prompts, optimised on their mean loss (the reference's IOI)"},
    "optimizer": {"choices": list(CHOICES["optimizer"])},
    "positions": {"choices": ["answer", "all"]},
    "reclamp": {"action": "store_true", "default": None, "help": "re-apply the clamp after delta"},
    "early_stop": {"action": "store_true", "default": None},
    "lambda_act": {"type": float},
    "lambda_decode": {"type": float},
    "lambda_delta": {"type": float},
    "max_drift": {"type": float,
                  "help": "keep each example's best step whose defended-feature drift is <= this (e.g. 0.03)"},
    "drift_penalty": {"choices": list(CHOICES["drift_penalty"]),
                      "help": "lambda_act's penalty: relative_l2 = ||Phi - Phi_def|| / ||Phi_def|| (ours), "
                              "relative_mse = squared, per site, mean over sites (the reference)"},
    "penalty_after_projection": {"action": "store_true", "default": None,
                                 "help": "jacobian / sketch: add the penalty's gradient after the projection "
                                         "(the reference; before it, the projection removes it)"},
    "drift_correction_steps": {"type": int, "help": "jacobian / sketch: plain gradient steps on the drift penalty "
                                                    "after each step (the reference: 5)"},
    "drift_correction_lr": {"type": float, "help": "their step size (the reference: 0.05)"},
    "checkpoint_every": {"type": int, "help": "best-checkpoint candidates every N steps, plus the first and last "
                                              "(the reference: 10)"},
    "checkpoint_after_update": {"action": "store_true", "default": None,
                                "help": "take candidates after their step's update, never delta = 0 (the reference)"},
    "checkpoint_fallback_weight": {"type": float, "help": "no candidate under --max-drift: keep the best score - W x "
                                                          "drift (the reference: 80; default: delta = 0)"},
    "anchor_steps": {"type": int, "help": "a first stage on the answer row alone (the reference's refusal stage "
                                          "1: 30); its delta stays fixed during the main stage"},
    "anchor_lr": {"type": float, "help": "the first stage's lr (the reference: 0.1)"},
    "anchor_budget": {"type": float, "help": "the first stage's budget (default: --budget; the reference: 40)"},
    "response_rows": {"type": int, "help": "at most this many rows for --positions response (the reference: 48)"},
    "phi_positions": {"choices": list(CHOICES["phi_positions"]),
                      "help": "rows Phi covers: from the first delta row on (ours), or the response (the reference)"},
    "batch_size": {"type": int},
    "seed": {"type": int},
    # the run directory
    "out": {"help": _RUN_DIR},
    "shard": {"help": "run only shard i of n (format i/n); join shards with `saerecover merge`"},
    "overwrite": {"action": "store_true", "help": "empty an existing run directory first"},
    "quiet": {"action": "store_true", "help": "no progress bars"},
    # where the work runs (docs/clusters.md)
    "ray": {"nargs": "?", "const": "local", "metavar": "ADDRESS",
            "help": "run on Ray (pip install 'saerecover[ray]'): a local instance, or the cluster at ADDRESS "
                    "(auto, ray://HOST:PORT or HOST:PORT); units in OUT.study/, merged into OUT"},
    "workers": {"type": int, "metavar": "N",
                "help": "--ray: workers (default: as many as the cluster's GPUs, or CPUs, fit)"},
    "units": {"type": int, "metavar": "N", "help": "--ray: work units, shards of the examples (default: one per worker)"},
    "gpus_per_worker": {"type": float, "metavar": "G", "help": "--ray: default 1 when the model is on CUDA, else 0"},
    "cpus_per_worker": {"type": float, "metavar": "C", "help": "--ray: default 1"},
}

#: The flags that send a command's runs to Ray (cli.execution).
EXECUTOR_FLAGS = "ray workers units gpus_per_worker cpus_per_worker"


def add_flags(parser: argparse.ArgumentParser, names: str, **overrides: dict[str, Any]) -> None:
    """Add the flags ``names`` (space-separated option names, in this order) to ``parser``, each
    as in :data:`FLAGS` (or only ``overrides[name]`` for a flag of one command) updated with
    ``overrides[name]``."""
    for name in names.split():
        spec = {**FLAGS.get(name, {}), **overrides.get(name, {})}
        parser.add_argument("--" + name.replace("_", "-"), **spec)


def world_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--protocol``, ``--toy`` and the model flags of the commands that run on the toy world or a
    model and SAE (run tpp, run unlearning, sweep)."""
    add_flags(parser, "config protocol toy model sae hook backend device dtype")


def task_recovery_flags(parser: argparse.ArgumentParser, *, budget: bool = True) -> None:
    """The delta search and output flags of run tpp, run unlearning and sweep (``budget``: with
    --budget; a budget sweep sets it itself)."""
    add_flags(parser, f"modes steps lr {'budget budget_rel ' if budget else ''}optimizer positions batch_size seed out "
                      f"overwrite quiet {EXECUTOR_FLAGS}",
              modes={"help": f"projection modes, comma-separated (default {MODES})"},
              positions={"help": f"rows where delta acts (default {TPP['positions']})"},
              out={"help": "output directory"},
              overwrite={"help": "empty existing run directories first"})


def ioi_flags(parser: argparse.ArgumentParser) -> None:
    """The IOI task and clamp flags of ``sweep --task ioi`` (``run ioi`` lists its own)."""
    add_flags(parser, "n patterns ioi_prompts top_k clamp_mode clamp_where", n={"help": "IOI prompts"})


def unlearning_flags(parser: argparse.ArgumentParser) -> None:
    """The unlearning task and clamp flags (run unlearning, ``sweep --task unlearning``)."""
    u = UNLEARNING
    add_flags(
        parser, "questions forget_corpus retain_corpus corpus_column limit forget_relation prompt_format top_n "
                "retain_threshold retain_rule clamp_value loss reduce success no_strict features",
        questions={"help": "JSON/JSONL/CSV with question, choices, answer (default: cais/wmdp from the hub)"},
        forget_corpus={"help": ".txt (a text a line) or JSONL/CSV/JSON with a text column"},
        retain_corpus={"help": "as --forget-corpus"},
        corpus_column={"help": f"text column of the corpora (default {u['corpus_column']})"},
        limit={"type": int, "help": "use the first N questions (0: all)"},
        forget_relation={"choices": list(CHOICES["forget_relation"]),
                         "help": f"--toy: the fact family to forget (default {u['forget_relation']})"},
        top_n={"type": int, "help": f"features by forget frequency (default {u['top_n']})"},
        retain_threshold={"type": float, "help": f"max retain firing frequency (default {u['retain_threshold']})"},
        clamp_value={"help": f"negative value where active (default {u['clamp_value']:g})"},
        loss={"choices": ["margin", "ce"]},
        prompt_format={"choices": list(CHOICES["prompt_format"]),
                       "help": "wmdp: header line, lm-eval style; reference: the paper's code's (no header, blank "
                               f"lines); toy: the toy world's own (default {u['prompt_format']}; --toy: toy)"},
        retain_rule={"choices": list(CHOICES["retain_rule"]),
                     "help": f"retain frequency at_most (<=) or below (<, SAEBench) the threshold (default "
                             f"{u['retain_rule']})"},
        reduce={"choices": list(CHOICES["reduce"]),
                "help": "the margin loss against the max or mean other letter (and the score's, with --success "
                        "margin)"},
        success={"choices": list(CHOICES["success"]),
                 "help": "B holds iff the loss's margin is > 0 (margin) or the correct letter is the argmax "
                         f"(default {u['success']})"},
        no_strict={"dest": "strict", "action": "store_false", "default": None,
                   "help": "keep questions not answered correctly under all 24 orders"},
    )

