"""The Hugging Face transformers backend: residual sites are the inputs and outputs of the
decoder layers, reached with forward (pre-)hooks that live only for one forward pass.

``blocks.L.hook_resid_pre``  = the hidden states entering decoder layer L (for L = 0: after the
embedding, position embedding and, for Gemma-2, the sqrt(d_model) scaling).
``blocks.L.hook_resid_post`` = the hidden states leaving decoder layer L (for the last layer:
before the final norm). Both match TransformerLens' hook points of the same name on the same
weights when TransformerLens does no weight processing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from saerecover.models.base import (
    SUPPORTED_ARCHITECTURES,
    Edit,
    TorchModelAdapter,
    apply_edit,
    plan_sites,
    resolve_device,
    resolve_dtype,
)

#: Where decoder-layer lists live, tried in order (GPT-2: ``transformer.h``; Llama, Gemma-2,
#: Mistral, Qwen: ``model.layers``; a few other layouts for good measure).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.layers",
    "model.language_model.layers",
    "language_model.model.layers",
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _architecture(model: torch.nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return archs[0] if archs else type(model).__name__


def find_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers; raises ValueError naming the paths tried."""
    config = getattr(model, "config", None)
    n_expected = None
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_expected = getattr(text_config, "num_hidden_layers", None)
    for path in LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            if n_expected is None or len(layers) == n_expected:
                return layers
    raise ValueError(
        f"unsupported architecture {_architecture(model)}: no decoder layer list found at any of "
        f"{list(LAYER_PATHS)}. Supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


class HFAdapter(TorchModelAdapter):
    """A transformers causal LM with editable residual sites (see ``ModelAdapter``)."""

    backend = "hf"
    #: HF weights are never processed, so residuals are never centred.
    centered_writing_weights = False

    def __init__(self, model: torch.nn.Module, tokenizer: object = None, *, freeze: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.architecture = _architecture(model)
        self.name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        self.layers = find_decoder_layers(model)
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            warnings.warn(
                f"{self.architecture} has a decoder layer list, so its residual sites work, but "
                f"only {sorted(SUPPORTED_ARCHITECTURES)} are checked against TransformerLens",
                stacklevel=3,
            )
        self.n_layers = len(self.layers)
        self.d_model = model.get_input_embeddings().embedding_dim
        self.processing: dict[str, bool] = {}
        model.eval()
        if freeze:
            model.requires_grad_(False)

    def __repr__(self) -> str:
        return (
            f"HFAdapter({self.architecture}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        edits: Mapping[str, Edit] | None = None,
        capture: tuple[str, ...] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See ``ModelAdapter.forward``. With an attention mask, position ids count real tokens
        only (as in HF ``generate`` and TransformerLens), so left padding works too; residuals
        at padded positions are unspecified."""
        if isinstance(capture, str):
            capture = (capture,)
        edits = dict(edits or {})
        plan = plan_sites(edits, capture, self.n_layers)
        captured: dict[str, torch.Tensor] = {}
        device = self.device
        input_ids = input_ids.to(device)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            kwargs["attention_mask"] = attention_mask
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        def visit(name: str, resid: torch.Tensor) -> torch.Tensor:
            if name in edits:
                resid = apply_edit(name, edits[name], resid)
            captured[name] = resid
            return resid

        handles = []
        try:
            for name, (layer, kind) in plan.items():
                module = self.layers[layer]
                if kind == "pre":
                    hook = partial(layer_pre_hook, partial(visit, name))
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = partial(layer_post_hook, partial(visit, name))
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            out = self.model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.float(), {name: captured[name] for name in capture}

    __call__ = forward


def layer_pre_hook(visit, module, args, kwargs):
    """The decoder layer's hidden states come first positionally, or as ``hidden_states=``."""
    if args:
        return (visit(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": visit(kwargs["hidden_states"])}
    raise RuntimeError(f"{type(module).__name__} was called without hidden states")


def layer_post_hook(visit, module, args, kwargs, output):
    """A decoder layer returns a tensor (transformers 5) or a tuple whose first item is it."""
    if isinstance(output, torch.Tensor):
        return visit(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((visit(output[0]), *output[1:]))
    raise TypeError(
        f"{type(module).__name__} returned {type(output).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden states"
    )


def use_softcap_safe_attention(model: torch.nn.Module) -> bool:
    """Switch a model with attention-logit soft capping (Gemma-2) from SDPA to eager attention;
    SDPA silently skips the soft cap, and some transformers 5 releases (e.g. 5.17) pick SDPA
    for Gemma-2 by default. Returns whether it switched."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "attn_logit_softcapping", None):
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation("eager")
    return True


def from_hf(model: torch.nn.Module, tokenizer: object = None, *, freeze: bool = True) -> HFAdapter:
    """Wrap an already-loaded transformers causal LM. The model is put in eval mode and, with
    ``freeze``, its parameters stop requiring gradients (only edits need them). A soft-capped
    model running SDPA attention is switched to eager attention (with a warning)."""
    if use_softcap_safe_attention(model):
        warnings.warn(
            f"{_architecture(model)} uses attention soft capping, which SDPA attention skips; "
            "switched the model to attn_implementation='eager'",
            stacklevel=2,
        )
    return HFAdapter(model, tokenizer, freeze=freeze)


def load_hf(
    name_or_dir: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: object = None,
    **kwargs: Any,
) -> HFAdapter:
    """Load a hub name or a local directory with ``AutoModelForCausalLM.from_pretrained`` (extra
    ``kwargs`` go there, e.g. ``revision`` or ``attn_implementation``) and its tokenizer.
    Soft-capped models (Gemma-2) get eager attention unless ``attn_implementation`` is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_progress_bar(Path(str(name_or_dir)).is_dir()):
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_dir), dtype=resolve_dtype(dtype), **kwargs
        )
    if "attn_implementation" not in kwargs:
        use_softcap_safe_attention(model)
    model.to(resolve_device(device))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
    return HFAdapter(model, tokenizer)


@contextlib.contextmanager
def _no_progress_bar(active: bool) -> Iterator[None]:
    """Hide transformers' "Loading weights" bar for a local directory (it takes milliseconds
    there); hub downloads keep their bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if active and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if active and was_enabled:
            hf_logging.enable_progress_bar()
