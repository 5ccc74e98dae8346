"""The ``saerecover`` command line: demo, run (ioi, tpp, unlearning, refusal), sweep, attribute, report,
analyze, merge, bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from saerecover import __version__
from saerecover.cli.analysis import add_analyze_parser, add_merge_parser, cmd_analyze, cmd_merge
from saerecover.cli.options import (
    CLIError,
    OneLineParser,
    check_options,
    check_out,
    load_config_file,
    one_line,
    resolve_options,
)
from saerecover.runs import RunDirectoryError

#: `saerecover run ioi` defaults: the paper's IOI setting (GPT-2 small, gpt2-small-res-jb).
IOI_DEFAULTS: dict[str, Any] = {
    "model": "gpt2",
    "sae": "gpt2-small-res-jb/blocks.4.hook_resid_pre",
    "hook": None,
    "backend": "hf",
    "device": None,
    "dtype": None,
    "n": 64,
    "patterns": "BABA",
    "top_k": 64,
    "features": None,
    "clamp_mode": "set",
    "clamp_value": -5.0,
    "clamp_where": "active",
    "modes": "none,encoder",
    "steps": 100,
    "lr": 0.1,
    "budget": 20.0,
    "optimizer": "adam",
    "positions": "answer",
    "reclamp": False,
    "early_stop": False,
    "lambda_act": 0.0,
    "lambda_decode": 0.0,
    "lambda_delta": 0.0,
    "max_drift": None,
    "batch_size": 32,
    "seed": 0,
    "out": None,
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/TOML file with any of the options below (flags win)")
    p.add_argument("--model", help="HF hub name or local directory (default: gpt2)")
    p.add_argument("--sae", help="sae_lens RELEASE/ID or a local SAE directory")
    p.add_argument("--hook", help="site hook name (default: the SAE's own hook_name)")
    p.add_argument("--backend", choices=["hf", "tlens"])
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--n", type=int, help="number of prompts")
    p.add_argument("--patterns", help="IOI name orders: BABA, ABBA or BABA,ABBA")
    p.add_argument("--top-k", type=int, help="features selected by attribution")
    p.add_argument("--features", help="explicit comma-separated feature indices (skips selection)")
    p.add_argument("--clamp-mode", choices=["set", "multiply", "zero"])
    p.add_argument("--clamp-value", type=float)
    p.add_argument("--clamp-where", choices=["all", "active"])
    p.add_argument("--modes", help="projection modes, comma-separated: none,encoder")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--budget", type=float, help="C4: ||delta||_F <= budget")
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--positions", choices=["answer", "all"])
    p.add_argument("--reclamp", action="store_true", default=None, help="re-apply the clamp after delta")
    p.add_argument("--early-stop", action="store_true", default=None)
    p.add_argument("--lambda-act", type=float)
    p.add_argument("--lambda-decode", type=float)
    p.add_argument("--lambda-delta", type=float)
    p.add_argument("--max-drift", type=float,
                   help="keep each example's best step whose defended-feature drift is <= this (e.g. 0.03)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (resumes if it exists with the same config)")
    p.add_argument("--shard", help="run only shard i of n (format i/n); join shards with `saerecover merge`")
    p.add_argument("--overwrite", action="store_true", help="empty an existing run directory first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_features(text: Any) -> list[int] | None:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as err:
        raise CLIError(f"--features must be comma-separated integers, got {text!r}") from err


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError as err:
        raise CLIError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from err
    if n < 1 or not 0 <= i < n:
        raise CLIError(f"--shard {text}: need 0 <= i < n")
    return i, n


def run_ioi(opts: dict[str, Any], *, quiet: bool = False, world: Any = None, shard: tuple[int, int] | None = None,
            overwrite: bool = False) -> Any:
    """Build model, site, task and clamp from resolved options and run the recovery."""
    import torch

    from saerecover.core.clamp import Clamp
    from saerecover.core.selection import select_by_attribution
    from saerecover.core.sites import load_site
    from saerecover.experiments.pipeline import recover
    from saerecover.tasks.ioi import IOI

    if opts["out"] is None:
        raise CLIError("--out DIR is required (the run directory to write)")
    check_out(opts["out"], task=None if overwrite else ("toy-ioi" if world is not None else "ioi"))
    opts = check_options(opts, IOI_DEFAULTS, local=world is None)  # before anything loads
    features = _parse_features(opts["features"])
    if world is not None:
        model, site = world.model, world.site(opts["hook"])
        task = world.ioi_task(n=opts["n"], seed=opts["seed"], patterns=opts["patterns"].split(","))
    else:
        from saerecover.models import load_model

        dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
        model = load_model(opts["model"], backend=opts["backend"], device=opts["device"], dtype=dtype)
        site = load_site(opts["sae"], hook_name=opts["hook"], model=model)
        if features is not None:
            site.check_features(features)  # before the task tokenizes anything
        task = IOI(model.tokenizer, n=opts["n"], seed=opts["seed"], patterns=opts["patterns"].split(","))
    if features is None:
        features = select_by_attribution(model, site, task, task.examples(), top_k=int(opts["top_k"]))
    clamp = Clamp({site: features}, value=opts["clamp_value"], mode=opts["clamp_mode"], where=opts["clamp_where"])
    modes = [m.strip() for m in str(opts["modes"]).split(",") if m.strip()]
    return recover(
        model, clamp, task, projection=modes, out=opts["out"], batch_size=int(opts["batch_size"]),
        progress=not quiet, steps=int(opts["steps"]), lr=float(opts["lr"]), budget=float(opts["budget"]),
        optimizer=opts["optimizer"], positions=opts["positions"], reclamp=bool(opts["reclamp"]),
        early_stop=bool(opts["early_stop"]), lambda_act=float(opts["lambda_act"]),
        lambda_decode=float(opts["lambda_decode"]), lambda_delta=float(opts["lambda_delta"]),
        max_drift=opts["max_drift"], seed=int(opts["seed"]), shard=shard, overwrite=overwrite,
        extra_config={"source": {"model": opts["model"], "sae": opts["sae"], "top_k": opts["top_k"]}},
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``saerecover run ioi``."""
    file_opts = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in IOI_DEFAULTS}
    opts = resolve_options(IOI_DEFAULTS, file_opts, flags)
    result = run_ioi(opts, quiet=args.quiet, shard=_parse_shard(args.shard), overwrite=args.overwrite)
    print(result.table())
    print(f"\nrun directory: {result.path}  ({result.seconds:.1f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from saerecover import toy

    t0 = time.perf_counter()
    out = args.out or "runs/demo"
    check_out(out)
    world = toy.load()
    opts = dict(IOI_DEFAULTS)
    opts.update(toy.DEMO_OPTIONS)
    opts["out"] = out
    print(f"saerecover {__version__} demo: toy IOI at {opts['hook']}, top-{opts['top_k']} features "
          f"clamped to {opts['clamp_value']} where active; modes none and encoder")
    result = run_ioi(opts, quiet=args.quiet, world=world)
    print(result.table())
    print(f"\nrun directory: {result.path} (report: {Path(result.path) / 'report.md'})")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from saerecover.report.collections import rewrite_report
    from saerecover.report.run import summary_table, write_report
    from saerecover.runs import open_run
    from saerecover.runs.collection import read_summary

    if read_summary(args.run_dir) is not None:  # a sweep or TPP directory: its combined report
        path, table = rewrite_report(args.run_dir)
        print(table)
        print(f"\nreport: {path}")
        return 0
    run = open_run(args.run_dir)
    path = write_report(run.path)
    print(summary_table(run.read_summary()))
    print(f"\nreport: {path}")
    return 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from saerecover.bench import projection

    parser = projection.add_arguments(OneLineParser(
        prog="saerecover bench",
        description="Time the Rust projections against NumPy, torch and the paper's per-row solve."))
    return int(projection.run_from_args(parser.parse_args(rest)) or 0)


def build_parser() -> argparse.ArgumentParser:
    from saerecover.cli.refusal import add_attribute_parser, add_refusal_parser
    from saerecover.cli.tasks import add_sweep_parser, add_tpp_parser, add_unlearning_parser

    parser = OneLineParser(prog="saerecover", description="Stress-test SAE feature clamps by post-intervention recovery.")
    parser.add_argument("--version", action="version", version=f"saerecover {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole method on the shipped toy model (CPU, about 15 s)")
    demo.add_argument("--out", help="run directory (default runs/demo)")
    demo.add_argument("--quiet", action="store_true")
    run = sub.add_parser("run", help="recover a clamped behavior and write a run directory")
    tasks = run.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=OneLineParser)
    ioi = tasks.add_parser("ioi", help="indirect object identification (the paper's IOI setting)")
    _add_run_flags(ioi)
    ioi.set_defaults(handler=cmd_run)
    add_tpp_parser(tasks)
    add_unlearning_parser(tasks)
    add_refusal_parser(tasks)
    rep = sub.add_parser("report", help="regenerate report.md and plots of a run directory, sweep or TPP collection")
    rep.add_argument("run_dir")
    add_sweep_parser(sub)
    add_attribute_parser(sub)
    add_analyze_parser(sub)
    add_merge_parser(sub)
    sub.add_parser("bench", help="projection benchmark (Rust core vs NumPy vs torch vs per-row solve)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argparse.Namespace(), argv[1:])
        args = parser.parse_args(argv)
        if args.command == "demo":
            return cmd_demo(args)
        if hasattr(args, "handler"):
            return int(args.handler(args) or 0)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "analyze":
            return cmd_analyze(args)
        if args.command == "merge":
            return cmd_merge(args)
    except (CLIError, ValueError, TypeError, OSError, MemoryError, RunDirectoryError) as err:
        print(f"saerecover: error: {one_line(err)}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
