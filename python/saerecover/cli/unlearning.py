"""``saerecover run unlearning``: a WMDP-style unlearning clamp (features by forget-vs-retain
frequency) under the strict 24-order protocol; also the setup ``sweep --task unlearning`` uses.

    saerecover run unlearning [--toy | --model M --sae S --questions Q.json --forget-corpus F --retain-corpus R]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from saerecover.cli.checks import parse_features, split_list
from saerecover.cli.execution import executor_from_args
from saerecover.cli.flags import task_recovery_flags, unlearning_flags, world_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import protocol_record
from saerecover.cli.world import load_world, recovery_kwargs, world_options

__all__ = ["add_unlearning_parser", "check_prompt_format", "cmd_run_unlearning", "unlearning_setup"]


def add_unlearning_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add ``unlearning`` to the ``run`` command's sub-parsers ``tasks``."""
    p = tasks.add_parser("unlearning", help="unlearning clamp (forget-vs-retain features), strict 24-order protocol")
    world_flags(p)
    unlearning_flags(p)
    task_recovery_flags(p)
    p.set_defaults(handler=cmd_run_unlearning)
    return p


def cmd_run_unlearning(args: argparse.Namespace) -> int:
    """``saerecover run unlearning``: print the questions kept and the table; exit 0."""
    from saerecover.experiments.unlearning import run_unlearning

    t0 = time.perf_counter()
    opts = world_options(args, "run unlearning")
    check_prompt_format(opts, args.toy)
    executor = executor_from_args(args)
    model, site = load_world(opts, args.toy)
    setup = unlearning_setup(opts, model, site, args.toy)
    result = run_unlearning(model, site, [], [], [], out=opts["out"], setup=setup, projection=split_list(opts["modes"]),
                            batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite,
                            budget=opts["budget"], executor=executor, **recovery_kwargs(opts))
    strict = result.info.get("strict") or {}
    print(f"questions kept (correct under all 24 orders): {strict.get('n_kept', result.info['n_questions_kept'])}"
          f"/{strict.get('n_questions', result.info['n_questions_kept'])}; {len(result.features)} features clamped "
          f"to {setup.selection['clamp_value']} where active")
    print(result.table())
    print(f"\nrun directory: {result.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(result.path)
    return 0


def check_prompt_format(opts: dict[str, Any], toy: bool) -> None:
    """The toy world takes only its own prompt format, a model only the others (checked before
    anything loads)."""
    if (opts["prompt_format"] == "toy") != bool(toy):
        raise CLIError(f"option prompt_format: {opts['prompt_format']!r} "
                       + ("is the toy world's own format; use wmdp or reference with --model" if not toy else
                          "does not fit the toy world, whose model knows only its own format (toy)"))


def unlearning_setup(opts: dict[str, Any], model: Any, site: Any, toy: bool,
                     command: str = "run unlearning") -> Any:
    """Questions, corpora, feature selection and clamp of an unlearning run (the toy world's fact
    families with ``toy``, else WMDP-style files)."""
    from saerecover.data import questions as questions_data
    from saerecover.experiments.unlearning import setup_unlearning
    from saerecover.tasks import unlearning as ul

    check_prompt_format(opts, toy)
    fmt = ul.FORMATS[opts["prompt_format"]]
    if toy:
        questions = questions_data.toy_questions(opts["forget_relation"])[: opts["limit"] or None]
        forget, retain = questions_data.toy_corpora(opts["forget_relation"])
    else:
        if opts["forget_corpus"] is None or opts["retain_corpus"] is None:
            raise CLIError("give --forget-corpus and --retain-corpus (text files for feature selection)")
        questions = questions_data.load_wmdp(opts["questions"], limit=opts["limit"] or None)
        forget = questions_data.load_corpus(opts["forget_corpus"], column=opts["corpus_column"])
        retain = questions_data.load_corpus(opts["retain_corpus"], column=opts["corpus_column"])
    if opts["loss"] not in ul.LOSSES:
        raise CLIError(f"option loss: {opts['loss']!r}; valid for unlearning: {', '.join(ul.LOSSES)}")
    return setup_unlearning(model, site, questions, forget, retain, fmt=fmt, top_n=opts["top_n"],
                            retain_threshold=opts["retain_threshold"], retain_rule=opts["retain_rule"],
                            clamp_value=opts["clamp_value"], loss=opts["loss"], reduce=opts["reduce"],
                            success=opts["success"], strict=bool(opts["strict"]),
                            features=parse_features(opts["features"]), batch_size=opts["batch_size"],
                            name="toy-unlearning" if toy else "wmdp-bio", protocol=protocol_record(opts, command))
