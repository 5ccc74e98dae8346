"""Model backends: a causal LM with editable residual sites, from HF transformers or
TransformerLens, behind one interface (``ModelAdapter``)."""

from __future__ import annotations

from typing import Any

import torch

from .base import (
    SUPPORTED_ARCHITECTURES,
    Edit,
    ModelAdapter,
    all_site_names,
    parse_site_name,
    resolve_device,
    resolve_dtype,
)
from .hf import HFAdapter, find_decoder_layers, from_hf, load_hf, use_softcap_safe_attention
from .tlens import (
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
    """Load a causal LM by hub name or local directory (the same code path for both).

    backend: ``"hf"`` (transformers) or ``"tlens"`` (TransformerLens HookedTransformer).
    device: default CUDA when available, else CPU. dtype: default float32 (e.g. torch.bfloat16
    or ``"bf16"`` for Gemma-2). The model is in eval mode with frozen parameters. Other
    ``kwargs`` go to the backend's loader (``tokenizer=``; for "tlens" also the processing
    switches ``fold_ln``, ``center_writing_weights``, ... which default to off, and ``n_ctx``).
    """
    if backend == "hf":
        return load_hf(name_or_dir, device=device, dtype=dtype, **kwargs)
    if backend == "tlens":
        return load_tlens(name_or_dir, device=device, dtype=dtype, **kwargs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")


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
    "find_decoder_layers",
    "from_hf",
    "from_tlens",
    "hooked_config_dict",
    "hooked_from_hf",
    "load_hf",
    "load_model",
    "load_tlens",
    "parse_site_name",
    "resolve_device",
    "resolve_dtype",
    "use_softcap_safe_attention",
    "writing_weights_centered",
]
