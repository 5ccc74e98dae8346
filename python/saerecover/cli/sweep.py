"""``saerecover sweep budget|features``: recovery against the norm budget (with the clamp's
robustness score) or against the feature-set size K, for IOI or unlearning, in one command.

    saerecover sweep budget   --budgets 1,2,5,10,20 [--task ioi|unlearning] [--toy | model flags] --out DIR
    saerecover sweep features --ks 4,8,16,32        [--task ioi|unlearning] [--toy | model flags] --out DIR
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from saerecover.cli import options
from saerecover.cli.checks import parse_features, parse_numbers, split_list
from saerecover.cli.execution import executor_from_args
from saerecover.cli.flags import (
    ioi_flags,
    task_recovery_flags,
    unlearning_flags,
    world_flags,
)
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.ioi import check_ioi_prompts, ioi_task
from saerecover.cli.resolve import protocol_record
from saerecover.cli.unlearning import check_prompt_format, unlearning_setup
from saerecover.cli.world import load_world, recovery_kwargs, world_options

__all__ = ["add_sweep_parser", "cmd_sweep_budget", "cmd_sweep_features"]

#: Each sweep: its grid option and help, and the help of its command.
_SWEEPS = {
    "budget": ("budgets", "comma-separated budgets > 0",
               "recovery and drift vs the norm budget, with the clamp's robustness score"),
    "features": ("ks", "comma-separated feature-set sizes", "recovery vs feature-set size K (valid set per K)"),
}


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sweep`` with its sub-commands ``budget`` and ``features`` to ``subparsers``."""
    p = subparsers.add_parser("sweep", help="recovery against the budget or the feature-set size, one command")
    sub = p.add_subparsers(dest="sweep", required=True)
    for kind, (grid, grid_help, help_) in _SWEEPS.items():
        s = sub.add_parser(kind, help=help_)
        s.add_argument("--task", choices=["ioi", "unlearning"], default="ioi")
        s.add_argument("--" + grid, help=f"{grid_help} (default {options.SWEEP_GRIDS[grid]})")
        world_flags(s)
        ioi_flags(s)
        unlearning_flags(s)
        task_recovery_flags(s, budget=kind == "features")
        s.set_defaults(handler=cmd_sweep_budget if kind == "budget" else cmd_sweep_features)
    return p


def cmd_sweep_budget(args: argparse.Namespace) -> int:
    """``saerecover sweep budget``: print the table and each mode's smallest recovering budget."""
    from saerecover.experiments.sweeps import budget_sweep

    t0 = time.perf_counter()
    opts, budgets, model, task, clamp, _, executor = _setup(args, "budgets")
    if opts.get("budget_rel") is not None:
        raise CLIError("sweep budget sets absolute budgets (--budgets); leave out budget_rel")
    res = budget_sweep(model, clamp, task, budgets, out=opts["out"], projection=split_list(opts["modes"]),
                       batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                       protocol=protocol_record(opts, f"sweep {args.task}"), executor=executor,
                       **recovery_kwargs(opts))
    print(res.table())
    print()
    for m, r in res.summary["robustness"].items():
        print(f"{m}: smallest recovering budget over {r['n']} examples: median {_budget(r['median'])}, "
              f"quartiles {_budget(r['q1'])}-{_budget(r['q3'])}, never recovered {r['never']}/{r['n']}")
    print(f"\nsweep directory: {res.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(res.path)
    return 0


def cmd_sweep_features(args: argparse.Namespace) -> int:
    """``saerecover sweep features``: print the table per K."""
    from saerecover.experiments.sweeps import feature_sweep

    t0 = time.perf_counter()
    if getattr(args, "features", None) is not None:
        raise CLIError("sweep features selects the features itself; leave out --features")
    opts, ks, model, task, _, make, executor = _setup(args, "ks")
    res = feature_sweep(model, task, ks, make_clamp=make, out=opts["out"], projection=split_list(opts["modes"]),
                        batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                        budget=opts["budget"], protocol=protocol_record(opts, f"sweep {args.task}"),
                        executor=executor, **recovery_kwargs(opts))
    print(res.table())
    print(f"\nsweep directory: {res.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(res.path)
    return 0


def _setup(args: argparse.Namespace, grid: str) -> tuple[dict[str, Any], list[Any], Any, Any, Any, Any, Any]:
    """(opts, grid values, model, task, clamp at the configured size, k -> clamp, executor); the
    grid and the executor are checked before anything loads."""
    from saerecover.core.clamp import Clamp
    from saerecover.data import toy_corpus as corpus
    from saerecover.experiments.sweeps import attribution_clamps, check_grid
    from saerecover.tasks.ioi import IOI

    opts = world_options(args, f"sweep {args.task}")
    values = check_grid(parse_numbers(opts[grid], grid, integer=grid == "ks"), grid, integer=grid == "ks")
    if args.task != "ioi":
        check_prompt_format(opts, args.toy)
    else:
        check_ioi_prompts(opts, args.toy)
    executor = executor_from_args(args)
    model, site = load_world(opts, args.toy)
    if args.task != "ioi":
        setup = unlearning_setup(opts, model, site, args.toy, command=f"sweep {args.task}")
        return (opts, values, model, setup.task, setup.clamp,
                None if opts["features"] is not None else setup.clamp_top, executor)
    pats = split_list(opts["patterns"])
    if args.toy:  # as ToyWorld.ioi_task: the corpus's own templates and names (ioi_prompts "toy")
        task = IOI(model.tokenizer, n=opts["n"], seed=opts["seed"], patterns=pats, templates=corpus.IOI_TEMPLATES,
                   names=corpus.NAMES, places=corpus.IOI_PLACES, objects=corpus.IOI_OBJECTS, name="toy-ioi")
    else:
        task = ioi_task(model.tokenizer, opts)
    if opts.get("features") is not None:
        clamp = Clamp({site: parse_features(opts["features"])}, value=opts["clamp_value"], mode=opts["clamp_mode"],
                      where=opts["clamp_where"])
        return opts, values, model, task, clamp, None, executor
    make = attribution_clamps(model, site, task, value=opts["clamp_value"], mode=opts["clamp_mode"],
                              where=opts["clamp_where"])
    return opts, values, model, task, make(int(opts["top_k"])), make, executor


def _budget(x: Any) -> str:
    return "never" if x is None else f"{x:g}"
