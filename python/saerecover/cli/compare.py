"""``saerecover compare defenses|saes``: which intervention survives the same recovery attack.

    saerecover compare defenses --toy --task ioi|refusal --defenses clamp,dir-ablate,hardened:3
                                --budgets 0.05,0.1,0.25 --out DIR
    saerecover compare saes     --toy --task ioi|refusal --sae blocks.1.hook_resid_post
                                --sae blocks.2.hook_resid_post --budgets 0.05,0.1,0.25 --out DIR

Budgets are relative to the defended residual's scale (C4: ||delta|| <= b x ||h_def||). One
collection directory, one run per (defense or SAE, budget); rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from saerecover.cli.checks import check_out_path, parse_numbers, split_list
from saerecover.cli.output import print_report_paths
from saerecover.cli.parsing import CLIError

__all__ = ["add_compare_parser", "cmd_compare_defenses", "cmd_compare_saes"]

#: The defense names (saerecover.core.defenses.DEFENSES, restated: that module imports torch).
DEFENSE_NAMES = ("clamp", "clamp-reclamp", "error-mean", "error-proj", "dir-ablate", "hardened:R[:k]")
DEFAULTS: dict[str, Any] = {
    "task": "ioi", "defenses": "clamp,clamp-reclamp,error-mean,error-proj,dir-ablate,hardened:3",
    "defense": "clamp", "budgets": None, "modes": "encoder", "n": 48, "top_k": 16, "steps": 40,
    "lr": None, "reference_texts": 32, "non_target": 8, "batch_size": 32, "seed": 0,
}
#: Per task, the defaults that depend on it: the toy refusal clamp needs larger deltas (run
#: refusal's recovery reaches 8/8 at about 0.8 x ||h_def||) and takes run refusal's lr.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "ioi": {"budgets": "0.05,0.1,0.25", "lr": 0.1},
    "refusal": {"budgets": "0.25,0.5,1", "lr": 0.2},
}
#: The toy world's SAEs ``compare saes --toy`` uses when no --sae is given.
TOY_SAES = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


def _common(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--toy", action="store_true", help="the shipped toy world (model, SAEs, corpus)")
    p.add_argument("--task", choices=["ioi", "refusal"], default=d["task"])
    p.add_argument("--budgets", default=d["budgets"],
                   help="comma-separated budgets relative to ||h_def|| (C4), each > 0 (default: ioi "
                        f"{TASK_DEFAULTS['ioi']['budgets']}; refusal {TASK_DEFAULTS['refusal']['budgets']})")
    p.add_argument("--modes", default=d["modes"],
                   help=f"projection modes, comma-separated; the first one ranks (default {d['modes']})")
    p.add_argument("--n", type=int, default=d["n"], help=f"task examples (default {d['n']})")
    p.add_argument("--top-k", type=int, default=d["top_k"], help=f"clamped features per site (default {d['top_k']})")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"recovery steps (default {d['steps']})")
    p.add_argument("--lr", type=float, default=d["lr"],
                   help=f"recovery learning rate (default: ioi {TASK_DEFAULTS['ioi']['lr']}; refusal "
                        f"{TASK_DEFAULTS['refusal']['lr']})")
    p.add_argument("--reference-texts", type=int, default=d["reference_texts"],
                   help=f"reference texts of the KL and of error-mean (default {d['reference_texts']})")
    p.add_argument("--non-target", type=int, default=d["non_target"],
                   help=f"refusal: held-out harmless requests of the collateral accuracy (default {d['non_target']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--out", required=True, help="the collection directory")
    p.add_argument("--overwrite", action="store_true", help="empty every run directory first (default: resume)")
    p.add_argument("--quiet", action="store_true")


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` with its sub-commands ``defenses`` and ``saes`` to ``subparsers``."""
    p = subparsers.add_parser("compare", help="rank defenses or SAEs by how hard their clamp is to undo")
    sub = p.add_subparsers(dest="compare", required=True)
    d = sub.add_parser("defenses", help="defense variants of one clamp under the same recovery attack")
    d.add_argument("--defenses", default=DEFAULTS["defenses"],
                   help=f"comma-separated, from {', '.join(DEFENSE_NAMES)} (default {DEFAULTS['defenses']})")
    _common(d)
    d.set_defaults(handler=cmd_compare_defenses)
    s = sub.add_parser("saes", help="the same clamp built on several SAEs, with a SAEBench-layout export")
    s.add_argument("--sae", action="append", default=None,
                   help=f"a toy SAE by its hook name (repeat; default: {', '.join(TOY_SAES)})")
    s.add_argument("--defense", default=DEFAULTS["defense"], help="the defense built on every SAE (default clamp)")
    _common(s)
    s.set_defaults(handler=cmd_compare_saes)
    return p


def _checked(args: argparse.Namespace) -> tuple[list[float], list[str]]:
    """The budgets and modes; every number checked before anything loads."""
    if not args.toy:
        raise CLIError("compare runs on the shipped toy world; give --toy")
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("n", "top_k", "steps", "reference_texts", "non_target", "batch_size"):
        v = getattr(args, key)
        if v < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr}")
    budgets = parse_numbers(args.budgets, "budgets", integer=False)
    if any(b <= 0 for b in budgets):
        raise CLIError(f"--budgets must all be > 0, got {args.budgets}")
    modes = split_list(args.modes)
    if not modes:
        raise CLIError("--modes names no projection mode")
    check_out_path(args.out)
    return budgets, modes


def _setting(world: Any, args: argparse.Namespace, hooks: tuple[str, ...] | None = None) -> tuple[Any, Any, Any]:
    """(task, clamp, collateral) of ``args.task`` in the toy world, the clamp at ``hooks``."""
    from saerecover.core.clamp import Clamp
    from saerecover.core.selection import attribution_scores, top_features
    from saerecover.data import toy_corpus as corpus
    from saerecover.data.requests import toy_requests
    from saerecover.experiments.collateral import Collateral, reference_examples
    from saerecover.experiments.refusal import DEFAULT_TOY_SITES, toy_setting
    from saerecover.tasks.refusal.task import Refusal

    model = world.model
    reference = reference_examples(model.tokenizer, corpus.documents(args.reference_texts, args.seed + 7919))
    if args.task == "ioi":
        hook = (hooks or ("blocks.1.hook_resid_post",))[0]
        site = world.site(hook)
        task = world.ioi_task(n=args.n, seed=args.seed)
        scores = attribution_scores(model, site, task, task.examples(), positions="answer")
        clamp = Clamp({site: top_features(scores, args.top_k)}, value=-5.0, where="active")
        col = Collateral(task, reference, "IOI prompts the base model gets right and the plain clamp does not flip",
                         outside_flips=True, batch_size=args.batch_size)
        return task, clamp, col
    setting = toy_setting(world, n=args.n, sites=hooks or DEFAULT_TOY_SITES, top_k=args.top_k, seed=args.seed)
    exclude = list(setting.task.requests)
    held_out = toy_requests(args.non_target, harmful=False, seed=args.seed + 101, exclude=exclude)
    non_target = Refusal(model, held_out, max_new_tokens=16, name="refusal-non-target",
                         source={"kind": "toy", "n": args.non_target, "seed": args.seed + 101})
    col = Collateral(non_target, reference, "held-out harmless requests (behavior: answered)",
                     batch_size=args.batch_size)
    return setting.task, setting.clamp, col


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {"steps": args.steps, "lr": args.lr, "seed": args.seed}
    if args.task == "refusal":
        out["positions"] = "prompt"
    return out


def cmd_compare_defenses(args: argparse.Namespace) -> int:
    """``saerecover compare defenses``: print the ranked table."""
    t0 = time.perf_counter()
    budgets, modes = _checked(args)
    from saerecover import toy
    from saerecover.core.defenses import parse_defenses
    from saerecover.experiments.compare import compare_defenses

    defenses = parse_defenses(args.defenses)
    world = toy.load()
    task, clamp, col = _setting(world, args)
    res = compare_defenses(world.model, clamp, task, defenses, budgets, out=args.out, collateral=col,
                           projection=modes, batch_size=args.batch_size, progress=not args.quiet,
                           overwrite=args.overwrite, **_overrides(args))
    print(res.table())
    print(f"\ncollection: {res.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(res.path)
    return 0


def cmd_compare_saes(args: argparse.Namespace) -> int:
    """``saerecover compare saes``: print the ranked table and where the SAEBench export is."""
    t0 = time.perf_counter()
    budgets, modes = _checked(args)
    saes = list(args.sae or TOY_SAES)
    if len(set(saes)) != len(saes):
        raise CLIError(f"--sae repeats: {saes}")
    from saerecover import toy
    from saerecover.core.defenses import DefenseContext, parse_defense
    from saerecover.experiments.compare import compare_saes

    defense = parse_defense(args.defense)
    if defense.rounds > 1:
        raise CLIError(f"compare saes takes a one-round defense, got {args.defense!r}")
    world = toy.load()
    clamps, info, col, task = {}, {}, None, None
    for hook in saes:
        site = world.site(hook)
        task_i, clamp, col_i = _setting(world, args, (hook,))
        if task is None:
            task, col = task_i, col_i
        elif args.task == "refusal" and list(task_i.requests) != list(task.requests):
            raise CLIError(f"the refusal requests answered at {hook} differ from the first SAE's; compare SAEs "
                           "on the same requests")
        name = hook
        ctx = DefenseContext(world.model, col_i.reference)
        clamps[name] = defense.build(clamp, ctx)
        info[name] = {"id": hook, "hook_name": site.hook_name, "source": site.source, "d_sae": site.d_sae,
                      "defense": defense.label, "cfg": _cfg(site)}
    res = compare_saes(world.model, clamps, task, budgets, out=args.out, saes=info, collateral=col, projection=modes,
                       batch_size=args.batch_size, progress=not args.quiet, overwrite=args.overwrite,
                       **{**_overrides(args), **dict(defense.recovery)})
    print(res.table())
    print(f"\nSAEBench-layout export: {', '.join(str(res.path / p) for p in res.summary['saebench_export'])}")
    print(f"collection: {res.path}  ({time.perf_counter() - t0:.1f} s)")
    print_report_paths(res.path)
    return 0


def _cfg(site: Any) -> dict[str, Any] | None:
    """The SAE's config as plain JSON (SAEBench's ``sae_cfg_dict``)."""
    cfg = getattr(getattr(site, "sae", None), "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    return json.loads(json.dumps(cfg.to_dict(), default=str))
