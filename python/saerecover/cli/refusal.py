"""``saerecover run refusal``: a multi-layer mean-activation clamp makes the model refuse; recover
the answer in the residual modes and with the soft-suffix baseline.

    saerecover run refusal --out DIR                       # the toy world's refusal setting
    saerecover run refusal --model google/gemma-2-2b --saes DIR1,DIR2 --requests advbench.csv \\
        --contrast harmful_and_harmless.csv --out DIR

The run directory follows the IOI contract (config.json, records.jsonl, tensors/, summary.json,
report.md, plots/); the summary's modes also carry the refusal metrics (non-refusal and
base-like rates with Wilson intervals, Phi drift) and the report a refusal table.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from saerecover.cli import options
from saerecover.cli.checks import split_budget, split_list
from saerecover.cli.execution import executor_from_args
from saerecover.cli.flags import EXECUTOR_FLAGS, add_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import protocol_record, resolve_command
from saerecover.core.config import RecoveryConfig

__all__ = ["DRIFT_AND_STAGE_OPTIONS", "add_refusal_parser", "cmd_run_refusal", "run_refusal_from_options"]

#: RecoveryConfig fields ``run refusal`` passes as they are (the drift penalty, the drift
#: corrections, the checkpoints and the two stages, where the reference chose otherwise).
DRIFT_AND_STAGE_OPTIONS = ("drift_penalty", "penalty_after_projection", "drift_correction_steps",
                           "drift_correction_lr", "checkpoint_every", "checkpoint_after_update",
                           "checkpoint_fallback_weight", "anchor_steps", "anchor_lr", "anchor_budget", "response_rows",
                           "phi_positions")


def add_refusal_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add ``refusal`` to the ``run`` command's sub-parsers ``tasks``."""
    p = tasks.add_parser(
        "refusal",
        help="refusal: a multi-layer mean-activation clamp makes the model refuse; recover the answer",
        description="Refusal recovery: features by refused-minus-answered contrast at every --saes site, each "
                    "set to its mean activation on refused requests at every position (or, --clamp multiply, "
                    "multiplied by 3 as the paper); valid flips are "
                    "requests the base model answers and the clamped model refuses; recovery in the residual "
                    "modes and the soft-suffix baseline. Default: the shipped toy world.",
    )
    add_flags(p, "protocol")
    add_flags(
        p, "config model saes hooks backend device dtype requests column limit contrast contrast_column n n_contrast "
           "min_contrast top_k features clamp clamp_scale clamp_multiplier contrast_positions template system_prompt "
           "max_new_tokens lists match "
           "lenient judge generation_deltas prefix_weight prefix_tokens discourage_refusal store_generations modes "
           "delta_site steps lr budget optimizer positions reclamp lambda_act drift_penalty penalty_after_projection "
           "drift_correction_steps drift_correction_lr lambda_delta max_drift checkpoint_every "
           "checkpoint_after_update checkpoint_fallback_weight sketch_probes anchor_steps anchor_lr anchor_budget "
           "response_rows phi_positions suffix_tokens suffix_lr suffix_budget batch_size seed attribute "
           "top_k_attribution out overwrite quiet " + EXECUTOR_FLAGS,
        model={"help": "HF hub name or local directory (default: the shipped toy world)"},
        saes={"help": "comma-separated SAEs, one per clamped site: local directories or RELEASE/ID "
                      "(default with the toy world: its SAEs at --hooks)"},
        hooks={"help": "comma-separated hook names of those SAEs (default: each SAE's own; toy: "
                       + ",".join(options.TOY_HOOKS) + ")"},
        requests={"help": "requests to test: .csv (AdvBench 'goal', HarmBench 'Behavior'), .json, "
                          ".jsonl, .txt or hf:ORG/NAME (default toy: harmless corpus requests)"},
        column={"help": "column of --requests holding the request"},
        limit={"type": int, "help": "use the first LIMIT requests"},
        contrast={"help": "requests whose base responses define the refused / answered classes of the feature "
                          "contrast (comma-separated files; default: --requests; toy: harmful + harmless corpus "
                          "requests)"},
        n={"help": "toy: number of harmless requests drawn"},
        n_contrast={"type": int, "help": "toy: harmful and harmless requests drawn for the contrast"},
        min_contrast={"type": int, "help": "fewest refused and fewest answered contrast requests the feature "
                                          "contrast is built on (fewer is an error naming the counts)"},
        top_k={"help": "features per site by refused-minus-answered contrast"},
        features={"help": "explicit features: 'HOOK:i,j,k;HOOK2:...' (skips selection there)"},
        clamp={"choices": list(options.CHOICES["clamp"]),
               "help": "mean: each feature set to its mean on refused requests (ours); multiply: multiplied by "
                       "--clamp-multiplier (the paper's), at every position"},
        clamp_scale={"type": float, "help": "--clamp mean: value = scale x mean activation on refused requests"},
        clamp_multiplier={"type": float, "help": "--clamp multiply: the factor (the paper's: 3)"},
        contrast_positions={"choices": ["prompt", "last"],
                            "help": "where contrast and clamp values are measured: every prompt token, or the "
                                    "last one (default: prompt; toy: last)"},
        template={"help": "plain prompt template with {request} (default: chat template if any; 'chat' forces it)"},
        system_prompt={"help": "chat template's system message (default: the template's own, which may add one, "
                               "e.g. SmolLM2's; '' gives an empty one); recorded in config.json"},
        max_new_tokens={"type": int},
        lists={"help": "refusal phrase lists (comma-separated): gcg, arditi, refusal_sae (the reference's), "
                       "jbb_classifier (jailbreakbench 1.0.0's); jailbreakbench = arditi"},
        match={"choices": list(options.CHOICES["match"]),
               "help": "phrase matching: the opening (ours), a case-insensitive substring anywhere, or a "
                       "case-sensitive one (jailbreakbench's rule, with --lists jbb_classifier)"},
        judge={"choices": list(options.CHOICES["judge"]),
               "help": "who decides answered vs refused: ours (--lists, --match, --lenient) or the reference's "
                       "(refusal_sae substrings; the clamped response also refused on a safety cue or a negative "
                       "opening); both are recorded either way"},
        generation_deltas={"choices": list(options.CHOICES["generation_deltas"]),
                           "help": "delta rows acting while the judge generates: prompt rows (the reference's "
                                   "generation) or all rows at their positions; with response rows both are "
                                   "recorded"},
        lenient={"dest": "strict", "action": "store_false", "default": None,
                 "help": "a response with a safety cue still counts as answered"},
        prefix_weight={"type": float},
        prefix_tokens={"type": int},
        discourage_refusal={"type": float, "help": "weight of log P(refusal opening) in the loss"},
        store_generations={"action": "store_true", "default": None,
                           "help": "keep full generated texts in the records (off: categories and hashes only)"},
        modes={"help": f"comma-separated: {options.REFUSAL['modes']}"},
        delta_site={"help": "site of the residual delta (default: the first clamped site; all: every clamped "
                            "site, as the reference)"},
        positions={"choices": ["prompt", "all", "response"],
                   "help": "rows of delta: the prompt, every row, or the teacher-forced response (the reference's "
                           "stage 2, with --anchor-steps)"},
        reclamp={"help": None},
        sketch_probes={"type": int, "help": "random probes of the sketch, beside its drift probe (the reference: 8)"},
        suffix_tokens={"type": int, "help": "soft-suffix baseline: placeholder tokens"},
        suffix_lr={"type": float},
        suffix_budget={"type": float},
        attribute={"action": "store_true", "default": None, "help": "also run the attribution replays"},
        top_k_attribution={"type": int},
    )
    p.set_defaults(handler=cmd_run_refusal)
    return p


def cmd_run_refusal(args: argparse.Namespace) -> int:
    """``saerecover run refusal``: print the summary and refusal tables; exit 0."""
    from saerecover.report.refusal import refusal_table

    t0 = time.perf_counter()
    opts = split_budget(resolve_command(args, "run refusal"))
    result, attribution = run_refusal_from_options(opts, quiet=bool(getattr(args, "quiet", False)),
                                                   overwrite=bool(getattr(args, "overwrite", False)),
                                                   executor=executor_from_args(args))
    print(result.table())
    print()
    print(refusal_table(result.summary))
    if attribution is not None:
        print()
        print(attribution.table())
    print(f"\nrun directory: {result.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(result.path)
    return 0


def _parse_feature_map(text: Any) -> dict[str, list[int]] | None:
    """--features 'HOOK:i,j;HOOK2:k' (or a mapping from a config file) as hook -> indices."""
    if text is None:
        return None
    if isinstance(text, dict):
        return {str(k): [int(i) for i in v] for k, v in text.items()}
    out: dict[str, list[int]] = {}
    for part in str(text).split(";"):
        if not part.strip():
            continue
        hook, sep, idx = part.partition(":")
        if not sep:
            raise ValueError(f"--features must look like 'HOOK:i,j;HOOK2:k', got {part!r}")
        try:
            out[hook.strip()] = [int(i) for i in idx.split(",") if i.strip()]
        except ValueError as err:
            raise ValueError(f"--features: indices of {hook.strip()!r} must be integers, got {idx!r}") from err
    return out


def _check(opts: dict[str, Any]) -> None:
    """Types and ranges of resolved ``run refusal`` options, before anything loads."""
    from saerecover.experiments.refusal import REFUSAL_MODES

    if not opts.get("out"):
        raise CLIError("--out DIR is required (the run directory to write)")
    modes = split_list(opts["modes"])
    bad = [m for m in modes if m not in REFUSAL_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"option modes: {opts['modes']!r} is not a comma-separated list of distinct modes from "
                         f"{', '.join(REFUSAL_MODES)}")
    for key in ("n", "n_contrast", "min_contrast", "top_k", "batch_size", "suffix_tokens", "top_k_attribution"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"option {key} must be an integer >= 1, got {v!r}")
    for key in ("clamp_scale", "clamp_multiplier", "prefix_weight", "discourage_refusal"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(float(v))):
            raise ValueError(f"option {key} must be a finite number, got {v!r}")
    for key, flag in (("n", "--n"), ("n_contrast", "--n-contrast")):
        if opts["model"] is not None and opts.get(key) != options.REFUSAL[key]:
            raise CLIError(f"{flag} draws toy-world requests and does nothing with --model; use --limit N to "
                           "use the first N of --requests (the contrast set is --contrast, default --requests)")
    if opts["model"] is not None and not opts["saes"]:
        raise CLIError("--model needs --saes (one SAE per clamped site)")
    if opts["model"] is not None and not opts["requests"]:
        raise CLIError("--model needs --requests FILE (the requests to test)")
    fields = RecoveryConfig.__dataclass_fields__
    RecoveryConfig(**{k: opts[k] for k in fields if k in opts and opts[k] is not None}).validate()


def _file_source(opts: dict[str, Any]) -> dict[str, Any]:
    """Where file requests came from (the run's config keeps this and the requests' hashes)."""
    return {"kind": "file", "path": str(Path(opts["requests"]).expanduser().resolve())
            if not str(opts["requests"]).startswith("hf:") else str(opts["requests"]),
            "column": opts["column"], "limit": opts["limit"]}


def run_refusal_from_options(opts: dict[str, Any], *, quiet: bool = False, overwrite: bool = False,
                             executor: Any = None) -> Any:
    """Build model, sites, task and clamp from resolved options, run every mode, and (with
    ``attribute``) the attribution replays."""
    import torch

    from saerecover import toy
    from saerecover.core.sites import load_site
    from saerecover.data.requests import load_requests, toy_requests
    from saerecover.experiments.attribution import attribute_run
    from saerecover.experiments.refusal import build_setting, run_refusal
    from saerecover.experiments.suffix import SuffixSettings
    from saerecover.models import load_model

    _check(opts)
    features = _parse_feature_map(opts["features"])
    lists = split_list(opts["lists"]) or ["gcg"]
    task_kw = {"template": opts["template"], "system_prompt": opts["system_prompt"], "lists": tuple(lists),
               "strict": bool(opts["strict"]),
               "match": opts["match"], "judge": opts["judge"], "generation_deltas": opts["generation_deltas"],
               "prefix_weight": float(opts["prefix_weight"]), "prefix_tokens": int(opts["prefix_tokens"]),
               "discourage_refusal": float(opts["discourage_refusal"]),
               "store_generations": bool(opts["store_generations"]), "progress": not quiet}
    by_world = options.REFUSAL_BY_WORLD["toy" if opts["model"] is None else "model"]
    max_new = opts["max_new_tokens"] or by_world["max_new_tokens"]
    positions = opts["contrast_positions"] or by_world["contrast_positions"]
    dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
    if opts["model"] is None:
        world = toy.load(backend=opts["backend"], device=opts["device"], dtype=dtype)
        model = world.model
        hooks = split_list(opts["hooks"]) or list(options.TOY_HOOKS)
        if opts["saes"]:
            sites = [load_site(s, hook_name=h, model=model) for s, h in zip(split_list(opts["saes"]), hooks)]
        else:
            sites = [world.site(h) for h in hooks]
        if opts["requests"]:
            requests = load_requests(opts["requests"], column=opts["column"], limit=opts["limit"])
            source = _file_source(opts)
        else:
            requests = toy_requests(int(opts["n"]), harmful=False, seed=int(opts["seed"]))
            source = {"kind": "toy", "n": int(opts["n"]), "seed": int(opts["seed"])}
        if opts["contrast"]:
            contrast = [r for f in split_list(opts["contrast"])
                        for r in load_requests(f, column=opts["contrast_column"])]
        else:
            contrast = (toy_requests(int(opts["n_contrast"]), harmful=True, seed=int(opts["seed"]) + 1)
                        + toy_requests(int(opts["n_contrast"]), harmful=False, seed=int(opts["seed"]) + 1,
                                       exclude=requests))
        source_model = str(world.root / "model")
    else:
        model = load_model(opts["model"], backend=opts["backend"], device=opts["device"], dtype=dtype)
        saes = split_list(opts["saes"])
        hooks = split_list(opts["hooks"])
        if hooks and len(hooks) != len(saes):
            raise ValueError(f"--hooks names {len(hooks)} sites for {len(saes)} SAEs")
        sites = [load_site(s, hook_name=(hooks[i] if hooks else None), model=model) for i, s in enumerate(saes)]
        requests = load_requests(opts["requests"], column=opts["column"], limit=opts["limit"])
        source = _file_source(opts)
        contrast = ([r for f in split_list(opts["contrast"]) for r in load_requests(f, column=opts["contrast_column"])]
                    if opts["contrast"] else requests)
        source_model = opts["model"]
    task_kw["max_new_tokens"] = int(max_new)
    task_kw["source"] = source
    setting = build_setting(model, sites, requests, contrast, top_k=int(opts["top_k"]), features=features,
                            scale=float(opts["clamp_scale"]), clamp=opts["clamp"],
                            multiplier=float(opts["clamp_multiplier"]), positions=positions,
                            min_contrast=int(opts["min_contrast"]), **task_kw)
    modes = split_list(opts["modes"])
    suffix = SuffixSettings(n_suffix=int(opts["suffix_tokens"]), lr=opts["suffix_lr"], budget=opts["suffix_budget"])
    result = run_refusal(
        model, setting.clamp, setting.task, modes=modes, out=opts["out"], delta_site=opts["delta_site"],
        suffix=suffix, batch_size=int(opts["batch_size"]), progress=not quiet, overwrite=overwrite,
        steps=int(opts["steps"]), lr=float(opts["lr"]), budget=float(opts.get("budget", options.REFUSAL["budget"])),
        budget_rel=opts["budget_rel"], optimizer=opts["optimizer"],
        positions=opts["positions"], reclamp=bool(opts["reclamp"]), lambda_act=float(opts["lambda_act"]),
        lambda_delta=float(opts["lambda_delta"]), max_drift=opts["max_drift"],
        sketch_probes=int(opts["sketch_probes"]), seed=int(opts["seed"]),
        **{k: opts[k] for k in DRIFT_AND_STAGE_OPTIONS},
        extra_config={"source": {"model": source_model, "backend": opts["backend"],
                                 "saes": [s.source for s in sites], "requests": opts["requests"],
                                 "contrast": opts["contrast"]},
                      "selection": setting.selection},
        protocol=protocol_record(opts, "run refusal"), executor=executor,
    )
    attribution = None
    if opts["attribute"]:
        attribution = attribute_run(result.path, top_k=int(opts["top_k_attribution"]), model=model,
                                    batch_size=int(opts["batch_size"]), progress=not quiet)
    return result, attribution
