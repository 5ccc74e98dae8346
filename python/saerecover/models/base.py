"""The interface every model backend implements: a causal LM whose residual stream can be
edited at TransformerLens-named sites (``blocks.{L}.hook_resid_pre`` / ``hook_resid_post``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch

#: An edit maps the residual at a site, ``(batch, seq, d_model)``, to its replacement.
Edit = Callable[[torch.Tensor], torch.Tensor]

_SITE_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def parse_site_name(hook_name: str, n_layers: int) -> tuple[int, str]:
    """Split ``blocks.{L}.hook_resid_{pre,post}`` into ``(L, "pre"|"post")``.

    Raises ValueError naming the valid forms when the name is unknown or L is out of range.
    """
    m = _SITE_RE.match(hook_name)
    if m is None:
        raise ValueError(
            f"unknown hook name {hook_name!r}: expected 'blocks.L.hook_resid_pre' or "
            f"'blocks.L.hook_resid_post' with 0 <= L < {n_layers}"
        )
    layer, kind = int(m.group(1)), m.group(2)
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"hook name {hook_name!r} names layer {layer}, but the model has {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    return layer, kind


@runtime_checkable
class ModelAdapter(Protocol):
    """A causal LM with editable residual sites. Both backends give the same residuals and
    logits on the same weights."""

    backend: str  # "hf" or "tlens"
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    n_layers: int
    d_model: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def site_names(self) -> list[str]:
        """Every residual site this model offers, in forward order."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        edits: Mapping[str, Edit] | None = None,
        capture: tuple[str, ...] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the model with ``edits`` applied at their sites.

        input_ids: (batch, seq). Returns logits (batch, seq, vocab) in float32 and, for each
        name in ``capture``, the residual at that site *after* its edit (batch, seq, d_model),
        still attached to the autograd graph. Sites are applied in forward order; an edit's
        output keeps the residual's dtype.
        """
        ...


# --- helpers shared by the backends -------------------------------------------------------

#: Model classes whose residual sites are checked against TransformerLens in the test suite.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Gemma2ForCausalLM": "gemma2",
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


class TorchModelAdapter:
    """What both backends share: ``device``, ``dtype`` and ``site_names`` from the wrapped
    ``torch.nn.Module`` (``self.model``) and ``self.n_layers``."""

    model: torch.nn.Module
    n_layers: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def site_names(self) -> list[str]:
        return all_site_names(self.n_layers)


def all_site_names(n_layers: int) -> list[str]:
    """``blocks.0.hook_resid_pre, blocks.0.hook_resid_post, blocks.1.hook_resid_pre, ...``"""
    return [f"blocks.{layer}.hook_resid_{kind}" for layer in range(n_layers) for kind in ("pre", "post")]


def plan_sites(
    edits: Mapping[str, Edit] | None, capture: tuple[str, ...] | list[str], n_layers: int
) -> dict[str, tuple[int, str]]:
    """Validate every hook name in ``edits`` and ``capture``; map each to ``(layer, kind)``."""
    if isinstance(capture, str):
        capture = (capture,)
    plan: dict[str, tuple[int, str]] = {}
    for name in list(edits or {}) + list(capture):
        if name not in plan:
            plan[name] = parse_site_name(name, n_layers)
    for name, edit in (edits or {}).items():
        if not callable(edit):
            raise TypeError(f"the edit for {name!r} is {type(edit).__name__}, not a callable")
    return plan


def apply_edit(hook_name: str, edit: Edit, resid: torch.Tensor) -> torch.Tensor:
    """Apply ``edit`` to the residual ``(batch, seq, d_model)`` at ``hook_name``; the result is
    cast back to the residual's dtype and device (a float32 delta on a bf16 model is fine)."""
    out = edit(resid)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the edit at {hook_name!r} returned {type(out).__name__}, not a tensor")
    if out.shape != resid.shape:
        raise ValueError(
            f"the edit at {hook_name!r} returned shape {tuple(out.shape)}; the residual there "
            f"has shape {tuple(resid.shape)}"
        )
    if out.dtype != resid.dtype or out.device != resid.device:
        out = out.to(device=resid.device, dtype=resid.dtype)
    return out


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` means float32; strings such as ``"bf16"`` or ``"bfloat16"`` are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPES)}")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A device string torch cannot parse, or a
    CUDA/MPS device this machine does not have, is a ValueError (before any weights load)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from err
    if dev.type == "meta":
        raise ValueError(f"device {device!r} holds shapes but no values: nothing can be computed on it; "
                         "use e.g. 'cpu' or 'cuda'")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA "
                             f"device(s) (valid: cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available here; use 'cpu'")
    return dev
