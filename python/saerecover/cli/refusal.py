"""``saerecover run refusal`` and ``saerecover attribute``: parsers and commands (wired in cli.py).

    saerecover run refusal --out DIR                       # the toy world's refusal setting
    saerecover run refusal --model google/gemma-2-2b --saes DIR1,DIR2 --requests advbench.csv \\
        --contrast harmful_and_harmless.csv --out DIR
    saerecover attribute DIR                               # replay attribution on a finished run

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

from saerecover.cli.options import split_list

__all__ = [
    "REFUSAL_DEFAULTS",
    "add_attribute_parser",
    "add_refusal_flags",
    "add_refusal_parser",
    "cmd_attribute",
    "cmd_run_refusal",
    "run_refusal_from_options",
]

#: ``saerecover run refusal`` defaults. model None: the shipped toy world (its SAEs at
#: ``hooks``, its own request format, corpus requests).
REFUSAL_DEFAULTS: dict[str, Any] = {
    "model": None,
    "saes": None,
    "hooks": None,
    "backend": "hf",
    "device": None,
    "dtype": None,
    "requests": None,
    "column": None,
    "limit": None,
    "contrast": None,
    "contrast_column": None,
    "n": 24,
    "n_contrast": 48,
    "top_k": 16,
    "features": None,
    "clamp_scale": 1.0,
    "contrast_positions": None,
    "template": None,
    "max_new_tokens": None,
    "lists": "gcg",
    "strict": True,
    "prefix_weight": 2.0,
    "prefix_tokens": 4,
    "discourage_refusal": 0.0,
    "store_generations": False,
    "modes": "none,encoder,jacobian,sketch,suffix",
    "delta_site": None,
    "steps": 100,
    "lr": 0.2,
    "budget": 40.0,
    "optimizer": "adam",
    "positions": "prompt",
    "reclamp": False,
    "lambda_act": 0.0,
    "lambda_delta": 0.0,
    "max_drift": None,
    "sketch_probes": 4,
    "suffix_tokens": 8,
    "suffix_lr": None,
    "suffix_budget": None,
    "batch_size": 16,
    "seed": 0,
    "attribute": False,
    "top_k_attribution": 10,
    "out": None,
}
#: The toy world's sites when --saes is not given.
TOY_HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
#: Toy default: its responses are short.
TOY_MAX_NEW_TOKENS = 16
REAL_MAX_NEW_TOKENS = 64


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_refusal_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``refusal`` (for ``saerecover run refusal``) to the ``run`` command's ``subparsers``;
    its ``handler`` is :func:`cmd_run_refusal`."""
    p = subparsers.add_parser(
        "refusal",
        help="refusal: a multi-layer mean-activation clamp makes the model refuse; recover the answer",
        description="Refusal recovery: features by refused-minus-answered contrast at every --saes site, each "
                    "set to its mean activation on refused requests at every position; valid flips are "
                    "requests the base model answers and the clamped model refuses; recovery in the residual "
                    "modes and the soft-suffix baseline. Default: the shipped toy world.",
    )
    add_refusal_flags(p)
    p.set_defaults(handler=cmd_run_refusal)
    return p


def add_refusal_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run refusal`` options to ``p`` (every default is None here: the resolved
    defaults are :data:`REFUSAL_DEFAULTS`, overridden by --config, then by flags)."""
    p.add_argument("--config", help="YAML/TOML/JSON file with any of the options below (flags win)")
    p.add_argument("--model", help="HF hub name or local directory (default: the shipped toy world)")
    p.add_argument("--saes", help="comma-separated SAEs, one per clamped site: local directories or RELEASE/ID "
                                  "(default with the toy world: its SAEs at --hooks)")
    p.add_argument("--hooks", help="comma-separated hook names of those SAEs (default: each SAE's own; toy: "
                                   + ",".join(TOY_HOOKS) + ")")
    p.add_argument("--backend", choices=["hf", "tlens"])
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--requests", help="requests to test: .csv (AdvBench 'goal', HarmBench 'Behavior'), .json, "
                                      ".jsonl, .txt or hf:ORG/NAME (default toy: harmless corpus requests)")
    p.add_argument("--column", help="column of --requests holding the request")
    p.add_argument("--limit", type=int, help="use the first LIMIT requests")
    p.add_argument("--contrast", help="requests whose base responses define the refused / answered classes of "
                                      "the feature contrast (comma-separated files; default: --requests; toy: "
                                      "harmful + harmless corpus requests)")
    p.add_argument("--contrast-column")
    p.add_argument("--n", type=int, help="toy: number of harmless requests drawn")
    p.add_argument("--n-contrast", type=int, help="toy: harmful and harmless requests drawn for the contrast")
    p.add_argument("--top-k", type=int, help="features per site by refused-minus-answered contrast")
    p.add_argument("--features", help="explicit features: 'HOOK:i,j,k;HOOK2:...' (skips selection there)")
    p.add_argument("--clamp-scale", type=float, help="clamp value = scale x mean activation on refused requests")
    p.add_argument("--contrast-positions", choices=["prompt", "last"],
                   help="where contrast and clamp values are measured: every prompt token, or the last one "
                        "(default: prompt; toy: last)")
    p.add_argument("--template", help="plain prompt template with {request} (default: chat template if any; "
                                      "'chat' forces it)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--lists", help="refusal phrase lists: gcg, jailbreakbench (comma-separated)")
    p.add_argument("--lenient", dest="strict", action="store_false", default=None,
                   help="a response with a safety cue still counts as answered")
    p.add_argument("--prefix-weight", type=float)
    p.add_argument("--prefix-tokens", type=int)
    p.add_argument("--discourage-refusal", type=float, help="weight of log P(refusal opening) in the loss")
    p.add_argument("--store-generations", action="store_true", default=None,
                   help="keep full generated texts in the records (off: categories and hashes only)")
    p.add_argument("--modes", help="comma-separated: none,encoder,jacobian,sketch,suffix")
    p.add_argument("--delta-site", help="site of the residual delta (default: the first clamped site)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--budget", type=float, help="C4: ||delta||_F <= budget")
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--positions", choices=["prompt", "all"])
    p.add_argument("--reclamp", action="store_true", default=None)
    p.add_argument("--lambda-act", type=float)
    p.add_argument("--lambda-delta", type=float)
    p.add_argument("--max-drift", type=float,
                   help="keep each example's best step whose defended-feature drift is <= this (e.g. 0.03)")
    p.add_argument("--sketch-probes", type=int)
    p.add_argument("--suffix-tokens", type=int, help="soft-suffix baseline: placeholder tokens")
    p.add_argument("--suffix-lr", type=float)
    p.add_argument("--suffix-budget", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--attribute", action="store_true", default=None, help="also run the attribution replays")
    p.add_argument("--top-k-attribution", type=int)
    p.add_argument("--out", help="run directory (resumes if it exists with the same config)")
    p.add_argument("--overwrite", action="store_true", help="empty an existing run directory first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def add_attribute_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``attribute RUN_DIR [--modes ...] [--top-k K] ...`` to ``subparsers``."""
    p = subparsers.add_parser(
        "attribute",
        help="recovery-path attribution: replay each component of every recovered delta under the clamp",
        description="Decompose every recovered delta of a finished refusal run (full delta, clamped and "
                    "non-clamped parts, top-k non-clamped, top-k knockout, SAE residual), replay each part "
                    "alone with the clamp active, and judge it as the run did. Loads the model and SAEs from "
                    "the run's config. Writes RUN_DIR/attribution.json and RUN_DIR/plots/attribution.png.",
    )
    p.add_argument("run_dir")
    p.add_argument("--modes", help="comma-separated modes (default: every residual mode of the run)")
    p.add_argument("--top-k", type=int, default=10, help="non-clamped features in the top-k components")
    p.add_argument("--model", help="override the model source recorded in the run")
    p.add_argument("--requests", help="the run's requests file, when its recorded source moved (matched by sha256)")
    p.add_argument("--column", help="column of --requests holding the request")
    p.add_argument("--device")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(handler=cmd_attribute)
    return p


# --------------------------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    from saerecover.cli.options import load_config_file, resolve_options

    file_opts = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in REFUSAL_DEFAULTS}
    return resolve_options(REFUSAL_DEFAULTS, file_opts, flags)


def _parse_feature_map(text: Any) -> dict[str, list[int]] | None:
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
    from saerecover.cli.options import CLIError
    from saerecover.core.config import RecoveryConfig
    from saerecover.experiments.refusal import REFUSAL_MODES

    if not opts.get("out"):
        raise CLIError("--out DIR is required (the run directory to write)")
    modes = split_list(opts["modes"])
    bad = [m for m in modes if m not in REFUSAL_MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"option modes: {opts['modes']!r} is not a comma-separated list of distinct modes from "
                         f"{', '.join(REFUSAL_MODES)}")
    for key in ("n", "n_contrast", "top_k", "batch_size", "suffix_tokens", "top_k_attribution"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"option {key} must be an integer >= 1, got {v!r}")
    for key in ("clamp_scale", "prefix_weight", "discourage_refusal"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(float(v))):
            raise ValueError(f"option {key} must be a finite number, got {v!r}")
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


def run_refusal_from_options(opts: dict[str, Any], *, quiet: bool = False, overwrite: bool = False) -> Any:
    """Build model, sites, task and clamp from resolved options, run every mode, and (with
    ``attribute``) the attribution replays."""
    import torch

    from saerecover.data.requests import load_requests, toy_requests
    from saerecover.experiments.refusal import build_setting, run_refusal
    from saerecover.experiments.suffix import SuffixSettings

    _check(opts)
    features = _parse_feature_map(opts["features"])
    lists = split_list(opts["lists"]) or ["gcg"]
    task_kw = dict(template=opts["template"], lists=tuple(lists), strict=bool(opts["strict"]),
                   prefix_weight=float(opts["prefix_weight"]), prefix_tokens=int(opts["prefix_tokens"]),
                   discourage_refusal=float(opts["discourage_refusal"]),
                   store_generations=bool(opts["store_generations"]))
    if opts["model"] is None:
        from saerecover import toy

        world = toy.load(backend=opts["backend"], device=opts["device"],
                         dtype=getattr(torch, opts["dtype"]) if opts["dtype"] else None)
        model = world.model
        hooks = split_list(opts["hooks"]) or list(TOY_HOOKS)
        if opts["saes"]:
            from saerecover.core.sites import load_site

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
        max_new = opts["max_new_tokens"] or TOY_MAX_NEW_TOKENS
        positions = opts["contrast_positions"] or "last"
    else:
        from saerecover.core.sites import load_site
        from saerecover.models import load_model

        dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
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
        max_new = opts["max_new_tokens"] or REAL_MAX_NEW_TOKENS
        positions = opts["contrast_positions"] or "prompt"
    task_kw["max_new_tokens"] = int(max_new)
    task_kw["source"] = source
    setting = build_setting(model, sites, requests, contrast, top_k=int(opts["top_k"]), features=features,
                            scale=float(opts["clamp_scale"]), positions=positions, **task_kw)
    modes = split_list(opts["modes"])
    suffix = SuffixSettings(n_suffix=int(opts["suffix_tokens"]), lr=opts["suffix_lr"], budget=opts["suffix_budget"])
    result = run_refusal(
        model, setting.clamp, setting.task, modes=modes, out=opts["out"], delta_site=opts["delta_site"],
        suffix=suffix, batch_size=int(opts["batch_size"]), progress=not quiet, overwrite=overwrite,
        steps=int(opts["steps"]), lr=float(opts["lr"]), budget=float(opts["budget"]), optimizer=opts["optimizer"],
        positions=opts["positions"], reclamp=bool(opts["reclamp"]), lambda_act=float(opts["lambda_act"]),
        lambda_delta=float(opts["lambda_delta"]), max_drift=opts["max_drift"],
        sketch_probes=int(opts["sketch_probes"]), seed=int(opts["seed"]),
        extra_config={"source": {"model": source_model, "backend": opts["backend"],
                                 "saes": [s.source for s in sites], "requests": opts["requests"],
                                 "contrast": opts["contrast"]},
                      "selection": setting.selection},
    )
    attribution = None
    if opts["attribute"]:
        from saerecover.experiments.attribution import attribute_run

        attribution = attribute_run(result.path, top_k=int(opts["top_k_attribution"]), model=model,
                                    batch_size=int(opts["batch_size"]))
    return result, attribution


def cmd_run_refusal(args: argparse.Namespace) -> int:
    """``saerecover run refusal``: print the summary and refusal tables; exit 0."""
    from saerecover.report.refusal import refusal_table

    t0 = time.perf_counter()
    opts = _resolve(args)
    result, attribution = run_refusal_from_options(opts, quiet=bool(getattr(args, "quiet", False)),
                                                   overwrite=bool(getattr(args, "overwrite", False)))
    print(result.table())
    print()
    print(refusal_table(result.summary))
    if attribution is not None:
        print()
        print(attribution.table())
    print(f"\nrun directory: {result.path}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    """``saerecover attribute RUN_DIR``: replay attribution; print the counts; exit 0."""
    from saerecover.cli.options import CLIError
    from saerecover.experiments.attribution import ATTRIBUTION_FILE, attribute_run
    from saerecover.runs import open_run

    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.run_dir).is_dir():
        raise CLIError(f"run directory {args.run_dir} does not exist")
    open_run(args.run_dir)  # a bad run directory fails here, before any model is loaded
    model = None
    if args.model:
        from saerecover.models import load_model

        model = load_model(args.model, device=args.device)
    requests = None
    if getattr(args, "requests", None):
        from saerecover.data.requests import load_requests

        requests = load_requests(args.requests, column=args.column)
    result = attribute_run(args.run_dir, modes=split_list(args.modes) or None, top_k=int(args.top_k),
                           device=args.device, model=model, requests=requests, batch_size=int(args.batch_size),
                           plot=not args.no_plot)
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nwritten: {Path(args.run_dir) / ATTRIBUTION_FILE}")
    return 0
