"""``saerecover run tpp``: SAEBench targeted probe perturbation (zero-ablate each class's probe
latents, recover the probe), on Bias in Bios, Amazon reviews, a local file or the toy world.

    saerecover run tpp [--toy | --model M --sae S --dataset bias_in_bios|amazon_reviews|file ...]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from saerecover.cli import options
from saerecover.cli.checks import split_list
from saerecover.cli.execution import executor_from_args
from saerecover.cli.flags import add_flags, task_recovery_flags, world_flags
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import protocol_record
from saerecover.cli.world import load_world, world_options

__all__ = ["add_tpp_parser", "cmd_run_tpp"]


def add_tpp_parser(tasks: Any) -> argparse.ArgumentParser:
    """Add ``tpp`` to the ``run`` command's sub-parsers ``tasks``."""
    p = tasks.add_parser("tpp", help="TPP (SAEBench): zero-ablate each class's probe latents, recover the probe")
    world_flags(p)
    add_flags(
        p, "dataset data test_data text_column label_column data_classes classes n_train n_test context_length "
           "top_n probe_trainer probe_epochs probe_lr probe_batch_size probe_l1 loss",
        dataset={"choices": list(options.CHOICES["dataset"]),
                 "help": "bias_in_bios / amazon_reviews (hub, or --data FILE), file (--data), toy"},
        data={"help": "local CSV/TSV/JSONL/JSON with text and label columns (optional split column)"},
        test_data={"help": "a separate test file (then --data is the train split)"},
        data_classes={"help": "comma-separated probe classes (default: SAEBench's class set / all labels)"},
        classes={"help": "comma-separated target classes to clamp and recover (default: all probe classes)"},
        n_train={"type": int, "help": "train texts per class"},
        n_test={"type": int, "help": "test texts per class"},
        context_length={"type": int},
        top_n={"type": int, "help": f"latents zero-ablated per class, any N >= 1 (default {options.TPP['top_n']}; "
                                    "--protocol reference: 500)"},
        probe_trainer={"choices": list(options.CHOICES["probe_trainer"]),
                       "help": "saerecover: Adam, zero init, last epoch; saebench: SAEBench's AdamW (wd 0.01), "
                               "nn.Linear init, the epoch with the best test accuracy (selected on evaluation data), "
                               "equal-share negatives"},
        probe_epochs={"type": int},
        probe_lr={"type": float},
        probe_batch_size={"type": int},
        probe_l1={"type": float},
        loss={"choices": ["logit", "bce"]},
    )
    task_recovery_flags(p)
    p.set_defaults(handler=cmd_run_tpp)
    return p


def cmd_run_tpp(args: argparse.Namespace) -> int:
    """``saerecover run tpp``: print the per-class table; exit 0."""
    from saerecover.experiments.tpp import run_tpp

    t0 = time.perf_counter()
    opts = world_options(args, "run tpp")
    executor = executor_from_args(args)
    data = _tpp_data(opts)
    model, site = load_world(opts, args.toy)
    targets = split_list(opts["classes"]) or None
    unknown = [c for c in targets or [] if c not in data.train]
    if unknown:
        raise CLIError(f"unknown target class(es) {unknown}; probe classes: {', '.join(data.classes)}")
    result = run_tpp(
        model, site, data, out=opts["out"], classes=targets, top_n=opts["top_n"], projection=split_list(opts["modes"]),
        context_length=opts["context_length"], seed=opts["seed"], loss=opts["loss"],
        batch_size=opts["batch_size"], progress=not args.quiet, overwrite=args.overwrite, budget=opts["budget"],
        probe={"epochs": opts["probe_epochs"], "lr": opts["probe_lr"], "batch_size": opts["probe_batch_size"],
               "l1": opts["probe_l1"]},
        probe_trainer=opts["probe_trainer"],
        steps=opts["steps"], lr=opts["lr"], budget_rel=opts["budget_rel"], optimizer=opts["optimizer"],
        positions=opts["positions"], protocol=protocol_record(opts, "run tpp"), executor=executor)
    print(result.table())
    print(f"\nTPP directory: {result.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(result.path)
    return 0


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
        return text_classes.load_text_classes(opts["data"], test_path=opts["test_data"], classes=classes, **cols,
                                              **sizes)
    if opts["test_data"] is not None:
        raise CLIError("--test-data goes with --dataset file")
    loader = text_classes.load_bias_in_bios if ds == "bias_in_bios" else text_classes.load_amazon_reviews
    if classes:
        sizes["classes"] = classes
    return loader(opts["data"], **cols, **sizes)
