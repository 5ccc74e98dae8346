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
from saerecover.cli.execution import executor_from_args
from saerecover.cli.flags import EXECUTOR_FLAGS, add_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import protocol_record, resolve_command

__all__ = ["add_demo_parser", "add_ioi_parser", "check_ioi_prompts", "cmd_demo", "cmd_run_ioi", "ioi_task", "run_ioi"]


def add_ioi_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add ``ioi`` to the ``run`` command's sub-parsers ``tasks``."""
    p = tasks.add_parser("ioi", help="indirect object identification (the paper's IOI setting)")
    add_flags(p, "config protocol toy model sae hook backend device dtype n patterns ioi_prompts top_k features "
                 "clamp_mode "
                 "clamp_value clamp_where modes steps lr budget budget_rel optimizer positions shared_delta reclamp early_stop lambda_act "
                 "lambda_decode lambda_delta max_drift batch_size seed out shard overwrite quiet " + EXECUTOR_FLAGS,
              config={"help": "YAML/TOML file with any of the options below (flags win)"},
              toy={"help": "the shipped toy world: its model, SAE and IOI prompts (the demo's setting)"},
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
    opts = resolve_command(args, "run ioi", toy=args.toy)
    shard = parse_shard(args.shard)
    result = run_ioi(opts, quiet=args.quiet, toy=args.toy, shard=shard, overwrite=args.overwrite,
                     executor=executor_from_args(args, shard=shard))
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
    budget = (f"{opts['budget_rel']:g} x ||h_def|| at the answer row" if opts["budget_rel"] is not None
              else f"{opts['budget']:g}")
    print(f"saerecover {__version__} demo: toy IOI at {opts['hook']}, top-{opts['top_k']} features "
          f"clamped to {opts['clamp_value']} where active; modes none and encoder; budget {budget}")
    result = run_ioi(opts, quiet=args.quiet, world=world)
    print(result.table())
    m = next(iter(result.summary["modes"].values()), {})
    if m.get("budget_mean") is not None:
        print(f"\nbudget (C4): ||delta|| <= {m['budget_mean']:.3g} on average = {m['relative_budget_mean']:.3g} x the "
              "defended residual's norm at the answer row")
    print(f"\nrun directory: {result.path}  (wall time {time.perf_counter() - t0:.1f} s)")
    print_report_paths(result.path)
    return 0


def check_ioi_prompts(opts: dict[str, Any], toy: bool) -> None:
    """The toy world takes only its own IOI prompts, a model only the others (before anything loads)."""
    if (opts["ioi_prompts"] == "toy") != bool(toy):
        raise CLIError(f"option ioi_prompts: {opts['ioi_prompts']!r} "
                       + ("is the toy world's own; use saerecover or reference with --model" if not toy else
                          "does not fit the toy world, whose model knows only its own names and templates (toy)"))
    if opts["ioi_prompts"] == "reference" and split_list(opts["patterns"]) != ["BABA"]:
        raise CLIError(f"option ioi_prompts reference: the reference prompts are BABA only, got patterns "
                       f"{opts['patterns']!r}")


def ioi_task(tokenizer: Any, opts: dict[str, Any]) -> Any:
    """The IOI task of a model (not the toy world) from checked options."""
    from saerecover.tasks.ioi import IOI

    if opts["ioi_prompts"] == "reference":
        return IOI.reference(tokenizer, n=opts["n"], seed=opts["seed"])
    return IOI(tokenizer, n=opts["n"], seed=opts["seed"], patterns=split_list(opts["patterns"]))


def run_ioi(opts: dict[str, Any], *, quiet: bool = False, world: Any = None, toy: bool = False,
            shard: tuple[int, int] | None = None, overwrite: bool = False, executor: Any = None) -> Any:
    """Check resolved options, build model, site, task and clamp from them (``world``, or with
    ``toy`` the shipped toy world loaded after the checks: the toy world's) and run the recovery
    (on ``executor``, when given: saerecover.experiments.executor)."""
    import torch

    from saerecover.core.clamp import Clamp
    from saerecover.core.selection import fewer_features_note, select_by_attribution
    from saerecover.core.sites import load_site
    from saerecover.experiments.pipeline import recover
    from saerecover.models import load_model

    if opts["out"] is None:
        raise CLIError("--out DIR is required (the run directory to write)")
    in_toy = toy or world is not None
    task_name = "toy-ioi" if in_toy else "ioi"
    check_out(opts["out"], task=None if overwrite else task_name)
    opts = check_options(opts, options.IOI, local=not in_toy)  # before anything loads
    check_ioi_prompts(opts, in_toy)
    features = parse_features(opts["features"])
    patterns = opts["patterns"].split(",")
    recovery = {"steps": int(opts["steps"]), "lr": float(opts["lr"]), "budget": float(opts["budget"]),
                "budget_rel": opts["budget_rel"], "shared_delta": bool(opts["shared_delta"]),
                "optimizer": opts["optimizer"], "positions": opts["positions"], "reclamp": bool(opts["reclamp"]),
                "early_stop": bool(opts["early_stop"]), "lambda_act": float(opts["lambda_act"]),
                "lambda_decode": float(opts["lambda_decode"]), "lambda_delta": float(opts["lambda_delta"]),
                "max_drift": opts["max_drift"], "seed": int(opts["seed"])}
    modes = split_list(opts["modes"])
    source = {"model": opts["model"], "sae": opts["sae"], "top_k": opts["top_k"]}
    if not overwrite:  # what config.json will hold, as far as it is known before anything loads
        check_out(opts["out"], task_name, expect=_expected_config(opts, task_name, recovery, modes, source, shard))
    if toy and world is None:
        from saerecover import toy as toy_world

        world = toy_world.load(backend=opts["backend"], device=opts["device"],
                               dtype=getattr(torch, opts["dtype"]) if opts["dtype"] else None)
    if world is not None:
        model, site = world.model, world.site(opts["hook"])
        task = world.ioi_task(n=opts["n"], seed=opts["seed"], patterns=patterns)
    else:
        dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
        model = load_model(opts["model"], backend=opts["backend"], device=opts["device"], dtype=dtype)
        site = load_site(opts["sae"], hook_name=opts["hook"], model=model)
        if features is not None:
            site.check_features(features)  # before the task tokenizes anything
        task = ioi_task(model.tokenizer, opts)
    selection: dict[str, Any] = {}
    if features is None:
        features = select_by_attribution(model, site, task, task.examples(), top_k=int(opts["top_k"]))
        note = fewer_features_note(site.hook_name, int(opts["top_k"]), len(features),
                                   "a positive attribution to the behavior")
        selection = {"selection": {"top_k": int(opts["top_k"]), "n_selected": len(features),
                                   **({"notes": [note]} if note else {})}}
    clamp = Clamp({site: features}, value=opts["clamp_value"], mode=opts["clamp_mode"], where=opts["clamp_where"])
    return recover(model, clamp, task, projection=modes, out=opts["out"], batch_size=int(opts["batch_size"]),
                   progress=not quiet, shard=shard, overwrite=overwrite, extra_config={"source": source, **selection},
                   protocol=protocol_record(opts, "run ioi"), executor=executor, **recovery)


def _expected_config(opts: dict[str, Any], task_name: str, recovery: dict[str, Any], modes: list[str],
                     source: dict[str, Any], shard: tuple[int, int] | None) -> dict[str, Any]:
    """The keys of an IOI run's config.json that the options decide alone (the model's and the
    clamp's descriptions need them loaded), for :func:`check_out` to compare with an existing run.
    The recovery settings are compared under the default protocol only (another protocol sets some
    of them when the run starts)."""
    from saerecover.core import protocol as protocols
    from saerecover.core.config import RecoveryConfig
    from saerecover.runs.directory import ABSENT

    out = {"task": {"name": task_name, "n": int(opts["n"]), "seed": int(opts["seed"])}, "modes": modes,
           "source": source, "shard": {"index": shard[0], "count": shard[1]} if shard is not None else ABSENT}
    if protocols.name_of(opts.get("protocol")) == protocols.DEFAULT:
        out["recovery"] = RecoveryConfig(**recovery).to_dict()
    return out
