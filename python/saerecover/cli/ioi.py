"""``saerecover run ioi`` (the paper's IOI setting on a model and SAE) and ``saerecover demo``
(the same method on the shipped toy world): parsers, handlers and the IOI run they share."""

from __future__ import annotations

import argparse
import time
from typing import Any

from saerecover import __version__
from saerecover.cli import options
from saerecover.cli.checks import (
    check_options,
    check_out,
    parse_features,
    parse_shard,
    split_list,
)
from saerecover.cli.flags import add_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import resolve

__all__ = ["add_demo_parser", "add_ioi_parser", "cmd_demo", "cmd_run_ioi", "run_ioi"]


def add_ioi_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add ``ioi`` to the ``run`` command's sub-parsers ``tasks``."""
    p = tasks.add_parser("ioi", help="indirect object identification (the paper's IOI setting)")
    add_flags(p, "config model sae hook backend device dtype n patterns top_k features clamp_mode clamp_value "
                 "clamp_where modes steps lr budget optimizer positions reclamp early_stop lambda_act "
                 "lambda_decode lambda_delta max_drift batch_size seed out shard overwrite quiet",
              config={"help": "YAML/TOML file with any of the options below (flags win)"},
              model={"help": f"HF hub name or local directory (default: {options.IOI['model']})"},
              modes={"help": f"projection modes, comma-separated: {options.MODES}"})
    p.set_defaults(handler=cmd_run_ioi)
    return p


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the top-level sub-parsers ``sub``."""
    p = sub.add_parser("demo", help="the whole method on the shipped toy model (CPU, about 15 s)")
    p.add_argument("--out", help=f"run directory (default {options.DEMO_OUT})")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_demo)
    return p


def cmd_run_ioi(args: argparse.Namespace) -> int:
    """``saerecover run ioi``: print the summary table; exit 0."""
    opts = resolve(args, options.defaults("run ioi"))
    result = run_ioi(opts, quiet=args.quiet, shard=parse_shard(args.shard), overwrite=args.overwrite)
    print(result.table())
    print(f"\nrun directory: {result.path}  ({result.seconds:.1f} s)")
    print_report_paths(result.path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``saerecover demo``: toy IOI end to end; print the table and where the report is."""
    from saerecover import toy

    t0 = time.perf_counter()
    opts = options.defaults("demo")
    if args.out:
        opts["out"] = args.out
    check_out(opts["out"])
    world = toy.load()
    print(f"saerecover {__version__} demo: toy IOI at {opts['hook']}, top-{opts['top_k']} features "
          f"clamped to {opts['clamp_value']} where active; modes none and encoder")
    result = run_ioi(opts, quiet=args.quiet, world=world)
    print(result.table())
    print(f"\nrun directory: {result.path}  (wall time {time.perf_counter() - t0:.1f} s)")
    print_report_paths(result.path)
    return 0


def run_ioi(opts: dict[str, Any], *, quiet: bool = False, world: Any = None, shard: tuple[int, int] | None = None,
            overwrite: bool = False) -> Any:
    """Check resolved options, build model, site, task and clamp from them (``world``: the toy
    world's) and run the recovery."""
    import torch

    from saerecover.core.clamp import Clamp
    from saerecover.core.selection import select_by_attribution
    from saerecover.core.sites import load_site
    from saerecover.experiments.pipeline import recover
    from saerecover.models import load_model
    from saerecover.tasks.ioi import IOI

    if opts["out"] is None:
        raise CLIError("--out DIR is required (the run directory to write)")
    check_out(opts["out"], task=None if overwrite else ("toy-ioi" if world is not None else "ioi"))
    opts = check_options(opts, options.IOI, local=world is None)  # before anything loads
    features = parse_features(opts["features"])
    patterns = opts["patterns"].split(",")
    if world is not None:
        model, site = world.model, world.site(opts["hook"])
        task = world.ioi_task(n=opts["n"], seed=opts["seed"], patterns=patterns)
    else:
        dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
        model = load_model(opts["model"], backend=opts["backend"], device=opts["device"], dtype=dtype)
        site = load_site(opts["sae"], hook_name=opts["hook"], model=model)
        if features is not None:
            site.check_features(features)  # before the task tokenizes anything
        task = IOI(model.tokenizer, n=opts["n"], seed=opts["seed"], patterns=patterns)
    if features is None:
        features = select_by_attribution(model, site, task, task.examples(), top_k=int(opts["top_k"]))
    clamp = Clamp({site: features}, value=opts["clamp_value"], mode=opts["clamp_mode"], where=opts["clamp_where"])
    return recover(
        model, clamp, task, projection=split_list(opts["modes"]), out=opts["out"], batch_size=int(opts["batch_size"]),
        progress=not quiet, steps=int(opts["steps"]), lr=float(opts["lr"]), budget=float(opts["budget"]),
        optimizer=opts["optimizer"], positions=opts["positions"], reclamp=bool(opts["reclamp"]),
        early_stop=bool(opts["early_stop"]), lambda_act=float(opts["lambda_act"]),
        lambda_decode=float(opts["lambda_decode"]), lambda_delta=float(opts["lambda_delta"]),
        max_drift=opts["max_drift"], seed=int(opts["seed"]), shard=shard, overwrite=overwrite,
        extra_config={"source": {"model": opts["model"], "sae": opts["sae"], "top_k": opts["top_k"]}},
    )
