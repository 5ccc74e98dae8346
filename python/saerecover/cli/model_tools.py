"""The commands that prepare a model for saerecover: ``saerecover convert`` (a GGUF checkpoint
to a normal Hugging Face directory) and ``saerecover train-sae`` (an SAE for a model that has
none)."""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["add_convert_parser", "cmd_convert"]


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
