"""Command-line pieces for TPP, unlearning and the sweeps, wired into ``saerecover`` by cli.py:

    saerecover run tpp          [--toy | --model M --sae S --dataset bias_in_bios|amazon_reviews|file ...]
    saerecover run unlearning   [--toy | --model M --sae S --questions Q.json --forget-corpus F --retain-corpus R]
    saerecover sweep budget     --budgets 1,2,5,10,20 [--task ioi|unlearning] [--toy | model flags] --out DIR
    saerecover sweep features   --ks 4,8,16,32        [--task ioi|unlearning] [--toy | model flags] --out DIR

Each ``add_*_parser(subparsers)`` adds one sub-command and sets ``handler`` to its ``cmd_*``
function.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from saerecover.cli.options import CLIError, check_options, load_config_file, resolve_options, split_list

# ----------------------------------------------------------------------------------------------
# defaults (flags < config file < defaults, as for `run ioi`)

_MODEL: dict[str, Any] = {"model": None, "sae": None, "hook": None, "backend": "hf", "device": None, "dtype": None}
_RECOVERY: dict[str, Any] = {"modes": "none,encoder", "steps": 100, "lr": 0.1, "budget": 20.0, "optimizer": "adam",
                             "positions": "all", "batch_size": 32, "seed": 0, "out": None}

TPP_DEFAULTS: dict[str, Any] = {
    **_MODEL, "dataset": "bias_in_bios", "data": None, "test_data": None, "text_column": None,
    "label_column": None, "data_classes": None, "classes": None, "n_train": 2000, "n_test": 500,
    "context_length": 128, "top_n": 10,
    "probe_epochs": 20, "probe_lr": 1e-3, "probe_batch_size": 16, "probe_l1": 1e-3, "loss": "logit",
    **_RECOVERY,
}
#: `run tpp --toy`: the toy world's topic sentences at layer 1.
TOY_TPP: dict[str, Any] = {"hook": "blocks.1.hook_resid_post", "dataset": "toy", "n_train": 40, "n_test": 20,
                           "top_n": 16, "probe_lr": 1e-2, "budget": 1.0}

UNLEARNING_DEFAULTS: dict[str, Any] = {
    **_MODEL, "questions": None, "forget_corpus": None, "retain_corpus": None, "corpus_column": "text",
    "limit": 0, "forget_relation": "inventor", "top_n": 20, "retain_threshold": 0.01, "clamp_value": -20.0,
    "loss": "margin", "reduce": "max", "strict": True, "features": None,
    **{**_RECOVERY, "steps": 150, "lr": 0.08},
}
#: `run unlearning --toy`: one toy fact family is the forget set, the others the retain set.
TOY_UNLEARNING: dict[str, Any] = {"hook": "blocks.1.hook_resid_post", "top_n": 16, "retain_threshold": 0.01,
                                  "clamp_value": -20.0, "budget": 10.0}

SWEEP_DEFAULTS: dict[str, Any] = {"budgets": "1,2,5,10,20", "ks": "4,8,16,32"}

_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("bias_in_bios", "amazon_reviews", "file", "toy"),
    "loss": ("logit", "bce", "margin", "ce"),
    "reduce": ("max", "mean"),
    "forget_relation": ("capital", "color", "inventor"),
}


def _numbers(text: Any, key: str, *, integer: bool) -> list[Any]:
    try:
        vals = [int(x) if integer else float(x) for x in split_list(text)]
    except ValueError as err:
        kind = "integers" if integer else "numbers"
        raise CLIError(f"option {key} must be comma-separated {kind}, got {text!r}") from err
    if not vals:
        raise CLIError(f"option {key} is empty")
    return vals


#: Integer options of these commands that must be >= 1 (besides cli_checks.POSITIVE_INTS).
_POSITIVE = ("top_n", "n_train", "n_test", "context_length", "probe_epochs", "probe_batch_size", "steps")


def _check(opts: dict[str, Any], defaults: dict[str, Any], *, local: bool) -> dict[str, Any]:
    """Types, choices and ranges of resolved options, before anything loads (the checks of
    ``saerecover run ioi`` plus this module's choices and counts)."""
    return check_options(opts, defaults, local=local, choices=_CHOICES, positive=_POSITIVE)


def _resolve(args: argparse.Namespace, defaults: dict[str, Any], toy: dict[str, Any] | None) -> dict[str, Any]:
    """defaults (< toy defaults with --toy) < config file < flags; then the checks of :func:`_check`."""
    file_opts = load_config_file(args.config) if getattr(args, "config", None) else {}
    base = dict(defaults)
    if getattr(args, "toy", False) and toy is not None:
        base.update(toy)
    flags = {k: v for k, v in vars(args).items() if k in defaults}
    opts = resolve_options(base, file_opts, flags)
    local = not getattr(args, "toy", False)
    if local and (opts.get("model") is None or opts.get("sae") is None):
        raise CLIError("give --model and --sae (or --toy for the shipped toy world)")
    checked = _check(opts, base, local=local)
    if checked.get("out") is None:
        raise CLIError("--out DIR is required")
    return checked


def _load(opts: dict[str, Any], toy: bool) -> tuple[Any, Any]:
    """(model adapter, site) from resolved options; the toy world with --toy."""
    import torch

    if toy:
        from saerecover import toy as toy_world

        world = toy_world.load(backend=opts["backend"], device=opts["device"],
                               dtype=getattr(torch, opts["dtype"]) if opts["dtype"] else None)
        return world.model, world.site(opts["hook"])
    from saerecover.core.sites import load_site
    from saerecover.models import load_model

    model = load_model(opts["model"], backend=opts["backend"], device=opts["device"],
                       dtype=getattr(torch, opts["dtype"]) if opts["dtype"] else None)
    return model, load_site(opts["sae"], hook_name=opts["hook"], model=model)


def _recovery(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: opts[k] for k in ("steps", "lr", "optimizer", "positions", "seed")}


def _modes(opts: dict[str, Any]) -> list[str]:
    return split_list(opts["modes"])


# ----------------------------------------------------------------------------------------------
# shared flags


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML/JSON file with any of the options below (flags win)")
    p.add_argument("--toy", action="store_true", help="use the shipped toy world (no download)")
    p.add_argument("--model", help="HF hub name or local directory")
    p.add_argument("--sae", help="sae_lens RELEASE/ID or a local SAE directory")
    p.add_argument("--hook", help="site hook name (default: the SAE's own hook_name)")
    p.add_argument("--backend", choices=["hf", "tlens"])
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])


def _recovery_flags(p: argparse.ArgumentParser, *, budget: bool = True) -> None:
    p.add_argument("--modes", help="projection modes, comma-separated (default none,encoder)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    if budget:
        p.add_argument("--budget", type=float, help="C4: ||delta||_F <= budget")
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--positions", choices=["answer", "all"], help="rows where delta acts (default all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="empty existing run directories first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _unlearning_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions",
                   help="JSON/JSONL/CSV with question, choices, answer (default: cais/wmdp from the hub)")
    p.add_argument("--forget-corpus", help=".txt (a text a line) or JSONL/CSV/JSON with a text column")
    p.add_argument("--retain-corpus", help="as --forget-corpus")
    p.add_argument("--corpus-column", help="text column of the corpora (default text)")
    p.add_argument("--limit", type=int, help="use the first N questions (0: all)")
    p.add_argument("--forget-relation", choices=list(_CHOICES["forget_relation"]),
                   help="--toy: the fact family to forget (default inventor)")
    p.add_argument("--top-n", type=int, help="features by forget frequency (default 20)")
    p.add_argument("--retain-threshold", type=float, help="max retain firing frequency (default 0.01)")
    p.add_argument("--clamp-value", type=float, help="negative value where active (default -20)")
    p.add_argument("--loss", choices=["margin", "ce"])
    p.add_argument("--reduce", choices=["max", "mean"], help="score against the max or mean other letter")
    p.add_argument("--no-strict", dest="strict", action="store_false", default=None,
                   help="keep questions not answered correctly under all 24 orders")
    p.add_argument("--features", help="explicit comma-separated feature indices (skips selection)")


def _ioi_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, help="IOI prompts")
    p.add_argument("--patterns", help="IOI name orders: BABA, ABBA or BABA,ABBA")
    p.add_argument("--top-k", type=int, help="features selected by attribution")
    p.add_argument("--clamp-mode", choices=["set", "multiply", "zero"])
    p.add_argument("--clamp-where", choices=["all", "active"])


# ----------------------------------------------------------------------------------------------
# run tpp


def add_tpp_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``tpp``: SAEBench targeted probe perturbation, recovered per class."""
    p = subparsers.add_parser("tpp", help="TPP (SAEBench): zero-ablate each class's probe latents, recover the probe")
    _model_flags(p)
    p.add_argument("--dataset", choices=list(_CHOICES["dataset"]),
                   help="bias_in_bios / amazon_reviews (hub, or --data FILE), file (--data), toy")
    p.add_argument("--data", help="local CSV/TSV/JSONL/JSON with text and label columns (optional split column)")
    p.add_argument("--test-data", help="a separate test file (then --data is the train split)")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--data-classes", help="comma-separated probe classes (default: SAEBench's class set / all labels)")
    p.add_argument("--classes", help="comma-separated target classes to clamp and recover (default: all probe classes)")
    p.add_argument("--n-train", type=int, help="train texts per class")
    p.add_argument("--n-test", type=int, help="test texts per class")
    p.add_argument("--context-length", type=int)
    p.add_argument("--top-n", type=int, help="latents zero-ablated per class (default 10)")
    p.add_argument("--probe-epochs", type=int)
    p.add_argument("--probe-lr", type=float)
    p.add_argument("--probe-batch-size", type=int)
    p.add_argument("--probe-l1", type=float)
    p.add_argument("--loss", choices=["logit", "bce"])
    _recovery_flags(p)
    p.set_defaults(handler=cmd_run_tpp)
    return p


def _tpp_data(opts: dict[str, Any]) -> Any:
    """The labelled texts; ``data_classes`` picks the probe classes (default: the dataset's
    SAEBench class set, or every label)."""
    from saerecover.data import text_classes

    classes = split_list(opts["data_classes"]) or None
    cols = {k: opts[k] for k in ("text_column", "label_column") if opts[k] is not None}
    sizes = {"n_train": opts["n_train"], "n_test": opts["n_test"], "seed": opts["seed"]}
    ds = opts["dataset"]
    if ds == "toy":
        data = text_classes.toy_topics(n_train=opts["n_train"], n_test=opts["n_test"], seed=opts["seed"])
        if classes:
            unknown = [c for c in classes if c not in data.train]
            if unknown:
                raise CLIError(f"unknown toy topic(s) {unknown}; valid: {', '.join(data.classes)}")
            data.train = {c: data.train[c] for c in classes}
            data.test = {c: data.test[c] for c in classes}
        return data
    if ds == "file":
        if opts["data"] is None:
            raise CLIError("--dataset file needs --data FILE")
        return text_classes.load_text_classes(opts["data"], test_path=opts["test_data"], classes=classes, **cols, **sizes)
    if opts["test_data"] is not None:
        raise CLIError("--test-data goes with --dataset file")
    loader = text_classes.load_bias_in_bios if ds == "bias_in_bios" else text_classes.load_amazon_reviews
    if classes:
        sizes["classes"] = classes
    return loader(opts["data"], **cols, **sizes)


def cmd_run_tpp(args: argparse.Namespace) -> int:
    from saerecover.experiments.tpp import run_tpp

    t0 = time.perf_counter()
    opts = _resolve(args, TPP_DEFAULTS, TOY_TPP)
    data = _tpp_data(opts)
    model, site = _load(opts, args.toy)
    targets = split_list(opts["classes"]) or None
    unknown = [c for c in targets or [] if c not in data.train]
    if unknown:
        raise CLIError(f"unknown target class(es) {unknown}; probe classes: {', '.join(data.classes)}")
    result = run_tpp(
        model, site, data, out=opts["out"], classes=targets, top_n=opts["top_n"], projection=_modes(opts),
        context_length=opts["context_length"], seed=opts["seed"], loss=opts["loss"],
        batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite, budget=opts["budget"],
        probe={"epochs": opts["probe_epochs"], "lr": opts["probe_lr"], "batch_size": opts["probe_batch_size"],
               "l1": opts["probe_l1"]},
        **{k: v for k, v in _recovery(opts).items() if k != "seed"})
    print(result.table())
    print(f"\nTPP directory: {result.path} (report: {Path(result.path) / 'report.md'}; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# run unlearning


def add_unlearning_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``unlearning``: WMDP-style unlearning clamp under the strict 24-order protocol."""
    p = subparsers.add_parser("unlearning",
                              help="unlearning clamp (forget-vs-retain features), strict 24-order protocol")
    _model_flags(p)
    _unlearning_flags(p)
    _recovery_flags(p)
    p.set_defaults(handler=cmd_run_unlearning)
    return p


def _unlearning_setup(opts: dict[str, Any], model: Any, site: Any, toy: bool) -> Any:
    from saerecover.data import questions as questions_data
    from saerecover.experiments import unlearning as ul_study
    from saerecover.tasks import unlearning as ul

    if toy:
        questions = questions_data.toy_questions(opts["forget_relation"])[: opts["limit"] or None]
        forget, retain = questions_data.toy_corpora(opts["forget_relation"])
        fmt = ul.TOY_FORMAT
    else:
        if opts["forget_corpus"] is None or opts["retain_corpus"] is None:
            raise CLIError("give --forget-corpus and --retain-corpus (text files for feature selection)")
        questions = questions_data.load_wmdp(opts["questions"], limit=opts["limit"] or None)
        forget = questions_data.load_corpus(opts["forget_corpus"], column=opts["corpus_column"])
        retain = questions_data.load_corpus(opts["retain_corpus"], column=opts["corpus_column"])
        fmt = ul.WMDP_FORMAT
    feats = [int(x) for x in split_list(opts["features"])] if opts["features"] is not None else None
    if opts["loss"] not in ul.LOSSES:
        raise CLIError(f"option loss: {opts['loss']!r}; valid for unlearning: {', '.join(ul.LOSSES)}")
    return ul_study.setup_unlearning(model, site, questions, forget, retain, fmt=fmt, top_n=opts["top_n"],
                               retain_threshold=opts["retain_threshold"], clamp_value=opts["clamp_value"],
                               loss=opts["loss"], reduce=opts["reduce"], strict=bool(opts["strict"]),
                               features=feats, batch_size=opts["batch_size"],
                               name="toy-unlearning" if toy else "wmdp-bio")


def cmd_run_unlearning(args: argparse.Namespace) -> int:
    from saerecover.experiments import unlearning as ul_study

    t0 = time.perf_counter()
    opts = _resolve(args, UNLEARNING_DEFAULTS, TOY_UNLEARNING)
    model, site = _load(opts, args.toy)
    setup = _unlearning_setup(opts, model, site, args.toy)
    result = ul_study.run_unlearning(model, site, [], [], [], out=opts["out"], setup=setup, projection=_modes(opts),
                               batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                               budget=opts["budget"], **_recovery(opts))
    strict = result.info.get("strict") or {}
    print(f"questions kept (correct under all 24 orders): {strict.get('n_kept', result.info['n_questions_kept'])}"
          f"/{strict.get('n_questions', result.info['n_questions_kept'])}; {len(result.features)} features clamped "
          f"to {setup.selection['clamp_value']} where active")
    print(result.table())
    print(f"\nrun directory: {result.path} ({time.perf_counter() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# sweeps


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``sweep``: with sub-commands ``budget`` and ``features``."""
    p = subparsers.add_parser("sweep", help="recovery against the budget or the feature-set size, one command")
    sub = p.add_subparsers(dest="sweep", required=True)
    for kind in ("budget", "features"):
        s = sub.add_parser(kind, help=("recovery and drift vs the norm budget, with the clamp's robustness score"
                                       if kind == "budget" else "recovery vs feature-set size K (valid set per K)"))
        s.add_argument("--task", choices=["ioi", "unlearning"], default="ioi")
        if kind == "budget":
            s.add_argument("--budgets", help="comma-separated budgets > 0 (default 1,2,5,10,20)")
        else:
            s.add_argument("--ks", help="comma-separated feature-set sizes (default 4,8,16,32)")
        _model_flags(s)
        _ioi_flags(s)
        _unlearning_flags(s)
        _recovery_flags(s, budget=kind == "features")
        s.set_defaults(handler=cmd_sweep_budget if kind == "budget" else cmd_sweep_features)
    return p


def _sweep_defaults(task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from saerecover import toy as toy_world
    from saerecover.cli.app import IOI_DEFAULTS

    if task == "ioi":
        toy = {k: v for k, v in toy_world.DEMO_OPTIONS.items() if k not in ("model", "sae")}
        return {**IOI_DEFAULTS, **SWEEP_DEFAULTS, "positions": "answer"}, toy
    return {**UNLEARNING_DEFAULTS, **SWEEP_DEFAULTS}, TOY_UNLEARNING


def _sweep_setup(args: argparse.Namespace, grid: str) -> tuple[dict[str, Any], list[Any], Any, Any, Any, Any]:
    """(opts, grid values, model, task, clamp at the configured size, k -> clamp); the grid is
    checked before anything loads."""
    from saerecover.experiments.sweeps import check_grid

    defaults, toy = _sweep_defaults(args.task)
    opts = _resolve(args, defaults, toy)
    values = check_grid(_numbers(opts[grid], grid, integer=grid == "ks"), grid, integer=grid == "ks")
    model, site = _load(opts, args.toy)
    if args.task == "ioi":
        from saerecover.core.clamp import Clamp
        from saerecover.experiments.sweeps import attribution_clamps
        from saerecover.tasks.ioi import IOI

        pats = split_list(opts["patterns"])
        if args.toy:  # as ToyWorld.ioi_task: the corpus's own templates and names
            from saerecover.data import toy_corpus as corpus

            task = IOI(model.tokenizer, n=opts["n"], seed=opts["seed"], patterns=pats,
                       templates=corpus.IOI_TEMPLATES, names=corpus.NAMES, places=corpus.IOI_PLACES,
                       objects=corpus.IOI_OBJECTS, name="toy-ioi")
        else:
            task = IOI(model.tokenizer, n=opts["n"], seed=opts["seed"], patterns=pats)
        if opts.get("features") is not None:
            feats = [int(x) for x in split_list(opts["features"])]
            clamp = Clamp({site: feats}, value=opts["clamp_value"], mode=opts["clamp_mode"], where=opts["clamp_where"])
            make = None
        else:
            make = attribution_clamps(model, site, task, value=opts["clamp_value"], mode=opts["clamp_mode"],
                                      where=opts["clamp_where"])
            clamp = make(int(opts["top_k"]))
        return opts, values, model, task, clamp, make
    setup = _unlearning_setup(opts, model, site, args.toy)
    return opts, values, model, setup.task, setup.clamp, (None if opts["features"] is not None else setup.clamp_top)


def cmd_sweep_budget(args: argparse.Namespace) -> int:
    from saerecover.experiments.sweeps import budget_sweep

    t0 = time.perf_counter()
    opts, budgets, model, task, clamp, _ = _sweep_setup(args, "budgets")
    res = budget_sweep(model, clamp, task, budgets, out=opts["out"], projection=_modes(opts),
                       batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                       **_recovery(opts))
    print(res.table())
    print()
    for m, r in res.summary["robustness"].items():
        print(f"{m}: smallest recovering budget over {r['n']} examples: median {_fmt(r['median'])}, "
              f"quartiles {_fmt(r['q1'])}-{_fmt(r['q3'])}, never recovered {r['never']}/{r['n']}")
    print(f"\nsweep directory: {res.path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_sweep_features(args: argparse.Namespace) -> int:
    from saerecover.experiments.sweeps import feature_sweep

    t0 = time.perf_counter()
    if getattr(args, "features", None) is not None:
        raise CLIError("sweep features selects the features itself; leave out --features")
    opts, ks, model, task, _, make = _sweep_setup(args, "ks")
    res = feature_sweep(model, task, ks, make_clamp=make, out=opts["out"], projection=_modes(opts),
                        batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                        budget=opts["budget"], **_recovery(opts))
    print(res.table())
    print(f"\nsweep directory: {res.path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _fmt(x: Any) -> str:
    return "never" if x is None else f"{x:g}"
