"""The world a ``--toy`` command runs in (run tpp, run unlearning, sweep): its options resolved
(defaults < protocol preset < toy preset with --toy < config file < flags) and checked before anything loads, then
the shipped toy world or ``--model`` / ``--sae`` loaded."""

from __future__ import annotations

import argparse
from typing import Any

from saerecover.cli import options
from saerecover.cli.checks import check_options
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import resolve_command

__all__ = ["load_world", "recovery_kwargs", "world_options"]


def world_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The checked options of ``command`` ("run tpp", "sweep unlearning", ...) from ``args``."""
    opts = resolve_command(args, command, toy=args.toy)
    base = options.defaults(command, toy=args.toy, protocol=opts["protocol"])
    if not args.toy and (opts.get("model") is None or opts.get("sae") is None):
        raise CLIError("give --model and --sae (or --toy for the shipped toy world)")
    checked = check_options(opts, base, local=not args.toy, positive=options.POSITIVE_TASK_INTS)
    if checked.get("out") is None:
        raise CLIError("--out DIR is required")
    return checked


def load_world(opts: dict[str, Any], toy: bool) -> tuple[Any, Any]:
    """(model adapter, site) from checked options; the toy world's with ``toy``."""
    import torch

    from saerecover import toy as toy_world
    from saerecover.core.sites import load_site
    from saerecover.models import load_model

    dtype = getattr(torch, opts["dtype"]) if opts["dtype"] else None
    if toy:
        world = toy_world.load(backend=opts["backend"], device=opts["device"], dtype=dtype)
        return world.model, world.site(opts["hook"])
    model = load_model(opts["model"], backend=opts["backend"], device=opts["device"], dtype=dtype)
    return model, load_site(opts["sae"], hook_name=opts["hook"], model=model)


def recovery_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """The delta-search keywords the --toy commands pass on to their experiment (budget apart:
    a budget sweep sets its own)."""
    return {k: opts[k] for k in ("steps", "lr", "budget_rel", "optimizer", "positions", "seed") if k in opts}
