"""The commands that prepare a model for saerecover: ``saerecover convert`` (a GGUF checkpoint
to a normal Hugging Face directory) and ``saerecover train-sae`` (an SAE for a model that has
none)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from saerecover.cli import options
from saerecover.cli.parsing import CLIError

__all__ = ["add_convert_parser", "add_train_sae_parser", "cmd_convert", "cmd_train_sae"]


def add_convert_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``convert MODEL.gguf OUT_DIR [--dtype]`` to the top-level sub-parsers ``sub``."""
    p = sub.add_parser("convert", help="write a .gguf model as a normal Hugging Face directory (needs the real extra)",
                       description="Dequantize a GGUF checkpoint (a .gguf file or a directory holding one) and "
                                   "write it with its tokenizer and chat template as a Hugging Face directory "
                                   "that --model loads in about a second.")
    p.add_argument("gguf", metavar="MODEL.gguf", help=".gguf file, or a directory holding exactly one")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (new or empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written weights (default float32)")
    p.set_defaults(handler=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    """``saerecover convert``: write the directory; print where and how long it took."""
    import torch

    from saerecover.models.gguf import convert, require_gguf, resolve_gguf

    source = resolve_gguf(args.gguf)  # before anything slow
    require_gguf()
    t0 = time.perf_counter()
    out = convert(source, args.out_dir, dtype=getattr(torch, args.dtype))
    print(f"converted {source.name} -> {out}  ({time.perf_counter() - t0:.1f} s); use --model {out}")
    return 0


def add_train_sae_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``train-sae --model M --hook HOOK --out DIR [...]`` to the top-level sub-parsers ``sub``."""
    d = options.TRAIN_SAE
    p = sub.add_parser(
        "train-sae", help="train an SAE for a model that has none (sae_lens' trainer, local text, no download)",
        description="Assemble a local text source (the model's own generations, chat requests, IOI prompts, "
                    "--text-file files), collect the residual at --hook without attention-sink rows (position 0 "
                    "and rows over --max-norm-ratio x the median norm), train with sae_lens' SAETrainer and write "
                    "an SAE directory that --sae loads (training_report.json beside it).")
    p.add_argument("--model", required=True, help="HF hub name, local directory, or .gguf file")
    p.add_argument("--hook", required=True, help="site, e.g. blocks.15.hook_resid_post")
    p.add_argument("--out", required=True, help="SAE directory to write (new or empty)")
    p.add_argument("--architecture", choices=["batchtopk", "topk", "standard"], default=d["architecture"],
                   help="batchtopk (saved as JumpReLU, so C1 pins clamped features), topk, standard (L1) "
                        f"(default {d['architecture']})")
    p.add_argument("--width", type=int, default=d["width"], help=f"SAE features (default {d['width']})")
    p.add_argument("--k", type=float, default=d["k"],
                   help=f"active features per token (topk) or on average (batchtopk) (default {d['k']:g})")
    p.add_argument("--l1", type=float, default=d["l1"], help=f"L1 coefficient of standard (default {d['l1']:g})")
    p.add_argument("--tokens", type=int, default=d["tokens"],
                   help=f"training samples the trainer sees, rows repeated over epochs (default {d['tokens']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"(default {d['batch_size']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"(default {d['lr']:g})")
    p.add_argument("--samples-per-opening", type=int, default=d["samples_per_opening"],
                   help=f"sampled continuations per plain-text opening (default {d['samples_per_opening']})")
    p.add_argument("--new-tokens", type=int, default=d["new_tokens"],
                   help=f"tokens per sampled continuation (default {d['new_tokens']})")
    p.add_argument("--answer-tokens", type=int, default=d["answer_tokens"],
                   help=f"tokens per greedy chat answer (default {d['answer_tokens']})")
    p.add_argument("--n-ioi", type=int, default=d["n_ioi"], help=f"IOI prompts in the text (default {d['n_ioi']})")
    p.add_argument("--text-file", action="append", default=[], help="local text file to include (repeatable)")
    p.add_argument("--max-norm-ratio", type=float, default=d["max_norm_ratio"],
                   help=f"drop rows over this x the median norm; position 0 is always dropped "
                        f"(default {d['max_norm_ratio']:g})")
    p.add_argument("--held-out", type=float, default=d["held_out"],
                   help=f"fraction of sequences kept for the evaluation (default {d['held_out']:g})")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_train_sae)
    return p


def cmd_train_sae(args: argparse.Namespace) -> int:
    """``saerecover train-sae``: train, write, print the held-out explained variance and L0."""
    for name in ("width", "tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("samples_per_opening", "new_tokens", "answer_tokens", "n_ioi"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 < args.held_out < 1:
        raise CLIError(f"--held-out must be in (0, 1), got {args.held_out}")
    if args.max_norm_ratio <= 1:
        raise CLIError(f"--max-norm-ratio must be > 1, got {args.max_norm_ratio}")
    missing = [f for f in args.text_file if not Path(f).is_file()]
    if missing:
        raise CLIError(f"--text-file {missing[0]} does not exist")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {out} exists and is not an empty directory; choose a new one")

    from saerecover.experiments.sae_training import SAESpec, Schedule, SinkRule, TextSourceSpec, train_model_sae
    from saerecover.models import load_model

    spec = SAESpec(architecture=args.architecture, width=args.width, k=args.k, l1=args.l1)
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    report = train_model_sae(
        model, args.hook, out, spec=spec,
        schedule=Schedule(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        text=TextSourceSpec(samples_per_opening=args.samples_per_opening, new_tokens=args.new_tokens,
                            answer_tokens=args.answer_tokens, n_ioi=args.n_ioi, text_files=tuple(args.text_file),
                            seed=args.seed),
        rule=SinkRule(max_norm_ratio=args.max_norm_ratio), held_out=args.held_out,
        model_name=Path(args.model).name, progress=not args.quiet)
    h, sink = report["held_out"], report["sink_exclusion"]
    print(f"SAE {report['architecture_saved']} width {report['d_sae']} at {args.hook}: held-out explained variance "
          f"{h['explained_variance']:.3f}, L0 {h['l0']:.1f}, dead {h['dead_fraction']:.3f} ({h['n_rows']} rows)")
    print(f"sink rows left out: {sink['rows_dropped_position0']} at position 0, {sink['rows_dropped_norm']} over "
          f"{sink['norm_threshold']:.4g} ({args.max_norm_ratio:g} x median norm {sink['median_norm']:.4g})")
    print(f"wrote {out}  ({time.perf_counter() - t0:.1f} s); use --sae {out}")
    return 0
