"""Model backends: a causal LM with editable residual sites, from HF transformers or
TransformerLens, behind one interface (``ModelAdapter``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from saerecover.models.base import (
    SUPPORTED_ARCHITECTURES,
    Edit,
    ModelAdapter,
    all_site_names,
    parse_site_name,
    resolve_device,
    resolve_dtype,
)
from saerecover.models.gguf import convert as convert_gguf
from saerecover.models.gguf import is_gguf_source, load_gguf
from saerecover.models.hf import HFAdapter, find_decoder_layers, from_hf, load_hf, use_softcap_safe_attention
from saerecover.models.tlens import (
    NO_PROCESSING,
    PROCESSING_KWARGS,
    TLensAdapter,
    from_tlens,
    hooked_config_dict,
    hooked_from_hf,
    load_tlens,
    writing_weights_centered,
)

BACKENDS: tuple[str, ...] = ("hf", "tlens")


def load_model(
    name_or_dir: str,
    *,
    backend: str = "hf",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> ModelAdapter:
    """Load a causal LM by hub name, local directory, or GGUF file (a ``.gguf``, or a directory
    holding one and no config.json: dequantized to ``dtype``, "hf" backend only).

    backend: ``"hf"`` (transformers) or ``"tlens"`` (TransformerLens HookedTransformer).
    device: default CUDA when available, else CPU. dtype: default float32 (e.g. torch.bfloat16
    or ``"bf16"`` for Gemma-2). The model is in eval mode with frozen parameters. Other
    ``kwargs`` go to the backend's loader (``tokenizer=``; for "tlens" also the processing
    switches ``fold_ln``, ``center_writing_weights``, ... which default to off, and ``n_ctx``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    resolve_dtype(dtype)
    resolve_device(device)  # both fail here, before any weights are read
    check_model_source(name_or_dir)
    if is_gguf_source(name_or_dir):
        if backend != "hf":
            raise ValueError(f"a .gguf model loads with the hf backend, not {backend!r}; or convert it first "
                             "(saerecover convert MODEL.gguf OUT_DIR) and load that directory")
        model, tok = load_gguf(name_or_dir, resolve_dtype(dtype))
        model.to(resolve_device(device))
        return HFAdapter(model, kwargs.get("tokenizer") or tok)
    if backend == "hf":
        return load_hf(name_or_dir, device=device, dtype=dtype, **kwargs)
    return load_tlens(name_or_dir, device=device, dtype=dtype, **kwargs)


def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub name ("gpt2", "org/name", a TransformerLens name)."""
    return (text.startswith(("/", "./", "../", "~", "\\")) or text.count("/") > 1
            or (len(text) > 1 and text[1] == ":") or text in (".", ".."))


def check_model_source(name_or_dir: Any) -> None:
    """Refuse, before anything loads, a local model path that does not exist, is not a
    directory, or has no config.json (FileNotFoundError naming what was expected); hub names
    are left to the loader."""
    if not isinstance(name_or_dir, (str, os.PathLike)):
        raise TypeError(f"model must be a hub name or a local directory (str or Path), "
                        f"got {type(name_or_dir).__name__}")
    text = os.fspath(name_or_dir)
    if not text.strip():
        raise ValueError("model name is empty; give a hub name (e.g. 'gpt2') or a local directory")
    path = Path(text).expanduser()
    if path.exists():
        if is_gguf_source(path):
            return
        if not path.is_dir():
            raise FileNotFoundError(f"model {text!r} is a file, not a model directory "
                                    "(expected a directory with config.json and the weights, or a .gguf file)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text} is not a model directory: it has no config.json "
                                    "(expected a save_pretrained directory: config.json, weights, tokenizer)")
    elif isinstance(name_or_dir, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"model directory {text} does not exist (a hub name looks like "
                                "'gpt2' or 'org/name')")


__all__ = [
    "BACKENDS",
    "NO_PROCESSING",
    "PROCESSING_KWARGS",
    "SUPPORTED_ARCHITECTURES",
    "Edit",
    "HFAdapter",
    "ModelAdapter",
    "TLensAdapter",
    "all_site_names",
    "check_model_source",
    "convert_gguf",
    "find_decoder_layers",
    "from_hf",
    "from_tlens",
    "hooked_config_dict",
    "hooked_from_hf",
    "is_gguf_source",
    "load_gguf",
    "load_hf",
    "load_model",
    "load_tlens",
    "parse_site_name",
    "resolve_device",
    "resolve_dtype",
    "use_softcap_safe_attention",
    "writing_weights_centered",
]
