"""The TransformerLens backend: a ``HookedTransformer`` (TransformerLens 3.x) whose
``blocks.L.hook_resid_pre`` / ``hook_resid_post`` hook points carry the edits and captures.

Weights are loaded without processing by default (no LayerNorm folding, no centring), so the
residuals equal the HF backend's on the same weights. Processing can be asked for (the
gpt2-small-res-jb SAEs were trained on ``center_writing_weights=True`` residuals); what was
actually applied is reported in ``adapter.processing`` and ``adapter.centered_writing_weights``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
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

#: TransformerLens' weight-processing switches, all off by default here.
PROCESSING_KWARGS: tuple[str, ...] = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)
NO_PROCESSING: dict[str, bool] = dict.fromkeys(PROCESSING_KWARGS, False)


class TLensAdapter(TorchModelAdapter):
    """A ``HookedTransformer`` with editable residual sites (see ``ModelAdapter``).

    ``processing``: the weight processing TransformerLens applied (``PROCESSING_KWARGS`` ->
    bool). ``centered_writing_weights``: whether the residuals are mean-centred over d_model
    (TransformerLens' ``center_writing_weights``), which SAEs such as gpt2-small-res-jb expect;
    a site centres its input itself when the backend did not. ``center_unembed`` shifts each
    position's logits by a constant (log-probabilities are unchanged).
    """

    backend = "tlens"

    def __init__(
        self,
        model: Any,
        tokenizer: object = None,
        *,
        processing: Mapping[str, bool] | None = None,
        centered_writing_weights: bool | None = None,
        freeze: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.architecture = model.cfg.original_architecture or type(model).__name__
        self.name = str(model.cfg.model_name)
        self.n_layers = model.cfg.n_layers
        self.d_model = model.cfg.d_model
        if centered_writing_weights is None:
            centered_writing_weights = writing_weights_centered(model)
        self.centered_writing_weights = bool(centered_writing_weights)
        if processing is None:
            processing = {
                "fold_ln": model.cfg.normalization_type in ("LNPre", "RMSPre"),
                "center_writing_weights": self.centered_writing_weights,
            }
        self.processing = dict(processing)
        model.eval()
        if freeze:
            model.requires_grad_(False)

    def __repr__(self) -> str:
        return (
            f"TLensAdapter({self.architecture}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"device={self.device}, dtype={self.dtype}, processing={self.processing})"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        edits: Mapping[str, Edit] | None = None,
        capture: tuple[str, ...] = (),
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See ``ModelAdapter.forward``. An explicit all-ones mask is passed when none is given,
        so that TransformerLens never infers padding from pad-token ids (it does so when its
        tokenizer pads on the left); residuals at padded positions are unspecified."""
        if isinstance(capture, str):
            capture = (capture,)
        edits = dict(edits or {})
        plan = plan_sites(edits, capture, self.n_layers)
        captured: dict[str, torch.Tensor] = {}
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)

        def make_hook(name: str):
            def hook(resid: torch.Tensor, hook: Any) -> torch.Tensor:
                if name in edits:
                    resid = apply_edit(name, edits[name], resid)
                captured[name] = resid
                return resid

            return hook

        fwd_hooks = [(name, make_hook(name)) for name in plan]
        with self.model.hooks(fwd_hooks=fwd_hooks):  # removes the hooks on exit, even on errors
            logits = self.model(input_ids, return_type="logits", attention_mask=attention_mask)
        return logits.float(), {name: captured[name] for name in capture}

    __call__ = forward


def writing_weights_centered(model: Any, rtol: float = 2e-3) -> bool:
    """Whether every matrix that writes to the residual stream (W_E, W_pos, W_O, W_out) has zero
    mean over d_model, i.e. TransformerLens' ``center_writing_weights`` was applied."""
    mats = [model.embed.W_E]
    if model.cfg.positional_embedding_type in ("standard", "shortformer"):
        mats.append(model.pos_embed.W_pos)
    for block in model.blocks:
        if hasattr(block, "attn"):
            mats.append(block.attn.W_O)
        if hasattr(block, "mlp") and hasattr(block.mlp, "W_out"):
            mats.append(block.mlp.W_out)
    for w in mats:
        w = w.detach().float()
        scale = w.abs().mean().clamp_min(1e-12)
        if (w.mean(-1).abs() > rtol * scale).any():
            return False
    return True


def _applied_processing(cfg: Any, requested: Mapping[str, bool]) -> dict[str, bool]:
    """What TransformerLens actually did with the requested processing (it silently skips
    centring for RMSNorm models and unembed centring under a logit soft cap)."""
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    ln_family = cfg.normalization_type in ("LN", "LNPre")
    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
    shortformer = cfg.positional_embedding_type == "shortformer"
    return {
        "fold_ln": bool(requested.get("fold_ln")) and cfg.normalization_type in ("LNPre", "RMSPre"),
        "center_writing_weights": bool(requested.get("center_writing_weights"))
        and ln_family
        and not cfg.final_rms
        and not post_norm
        and not shortformer,
        "center_unembed": bool(requested.get("center_unembed"))
        and not softcap_enabled(cfg.output_logits_soft_cap)
        and not shortformer,
        "fold_value_biases": bool(requested.get("fold_value_biases")),
        "refactor_factored_attn_matrices": bool(requested.get("refactor_factored_attn_matrices")),
    }


# --- HookedTransformerConfig from a transformers config --------------------------------------


def _rope(hf_config: Any) -> tuple[float, dict[str, Any]]:
    """(rope_theta, extra HookedTransformerConfig fields) from either the transformers-5
    ``rope_parameters`` dict or the older ``rope_theta`` / ``rope_scaling`` attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = (params.get("rope_type") or params.get("type") or "default").lower()
    if rope_type == "default":
        return theta, {}
    if rope_type == "llama3":
        return theta, {
            "use_NTK_by_parts_rope": True,
            "NTK_original_ctx_len": params.get(
                "original_max_position_embeddings", hf_config.max_position_embeddings
            ),
            "NTK_by_parts_low_freq_factor": params.get("low_freq_factor", 1.0),
            "NTK_by_parts_high_freq_factor": params.get("high_freq_factor", 4.0),
            "NTK_by_parts_factor": params.get("factor", 1.0),
        }
    raise NotImplementedError(
        f"rope_type {rope_type!r} is not converted to TransformerLens here (only 'default' and "
        "'llama3'); use backend='hf'"
    )


def hooked_config_dict(hf_config: Any, *, n_ctx: int | None = None) -> dict[str, Any]:
    """The HookedTransformerConfig fields for a GPT-2, Llama or Gemma-2 transformers config,
    following TransformerLens' own ``convert_hf_model_config`` for these families but read
    from the config itself (TransformerLens picks Llama/Gemma configs by model *name*, which
    fails for local directories)."""
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else None
    if arch is None:
        model_type = getattr(hf_config, "model_type", None)
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(
            {"gemma2": "gemma2", "llama": "llama", "gpt2": "gpt2"}.get(model_type, ""), None
        )
    if arch == "GPT2LMHeadModel":
        d_model = hf_config.n_embd
        cfg = {
            "d_model": d_model,
            "d_head": d_model // hf_config.n_head,
            "n_heads": hf_config.n_head,
            "d_mlp": hf_config.n_inner or 4 * d_model,
            "n_layers": hf_config.n_layer,
            "n_ctx": hf_config.n_positions,
            "eps": hf_config.layer_norm_epsilon,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.activation_function,
            "use_attn_scale": getattr(hf_config, "scale_attn_weights", True),
            "use_local_attn": False,
            "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
        }
    elif arch == "LlamaForCausalLM":
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise NotImplementedError(
                "TransformerLens' Llama conversion drops attention/MLP biases; this config has "
                "attention_bias or mlp_bias set. Use backend='hf'"
            )
        n_heads = hf_config.num_attention_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
        theta, rope_extra = _rope(hf_config)
        cfg = {
            "d_model": hf_config.hidden_size,
            "d_head": d_head,
            "n_heads": n_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": hf_config.num_hidden_layers,
            "n_ctx": hf_config.max_position_embeddings,
            "eps": hf_config.rms_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.hidden_act,
            "n_key_value_heads": n_kv if n_kv != n_heads else None,
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": d_head,
            "rotary_base": theta,
            "final_rms": True,
            "gated_mlp": True,
            **rope_extra,
        }
    elif arch == "Gemma2ForCausalLM":
        theta, rope_extra = _rope(hf_config)
        if rope_extra:
            raise NotImplementedError("Gemma-2 with rope scaling is not supported; use backend='hf'")
        n_layers = hf_config.num_hidden_layers
        layer_types = getattr(hf_config, "layer_types", None) or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
        ]
        window = getattr(hf_config, "sliding_window", None)
        cfg = {
            "d_model": hf_config.hidden_size,
            "d_head": hf_config.head_dim,
            "n_heads": hf_config.num_attention_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": n_layers,
            "n_ctx": hf_config.max_position_embeddings,
            "eps": hf_config.rms_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act,
            "normalization_type": "RMS",
            "rotary_base": theta,
            "rotary_dim": hf_config.head_dim,
            "positional_embedding_type": "rotary",
            "use_attn_scale": True,
            # HF scales scores by query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5)
            "attn_scale": math.sqrt(hf_config.query_pre_attn_scalar),
            "n_key_value_heads": hf_config.num_key_value_heads,
            "use_local_attn": window is not None,
            "window_size": window,
            "attn_types": [
                "local" if t == "sliding_attention" and window is not None else "global"
                for t in layer_types
            ],
            "attn_scores_soft_cap": hf_config.attn_logit_softcapping or -1.0,
            "output_logits_soft_cap": hf_config.final_logit_softcapping or -1.0,
            "gated_mlp": True,
            "final_rms": True,
            "use_normalization_before_and_after": True,
        }
    else:
        raise ValueError(
            f"unsupported architecture {arch} for the TransformerLens backend from a "
            f"transformers model; supported: {sorted(SUPPORTED_ARCHITECTURES)}. Load it with "
            "backend='hf', or pass a TransformerLens model name"
        )
    if n_ctx is not None:
        cfg["n_ctx"] = n_ctx
    cfg["original_architecture"] = arch
    cfg["tie_word_embeddings"] = bool(getattr(hf_config, "tie_word_embeddings", False))
    return cfg


def _convert_weights(hf_model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_gemma_weights,
        convert_gpt2_weights,
        convert_llama_weights,
    )

    converters = {
        "GPT2LMHeadModel": convert_gpt2_weights,
        "LlamaForCausalLM": convert_llama_weights,
        "Gemma2ForCausalLM": convert_gemma_weights,
    }
    return converters[cfg.original_architecture](hf_model, cfg)


def hooked_from_hf(
    hf_model: Any,
    tokenizer: object = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    n_ctx: int | None = None,
    **processing: bool,
) -> tuple[Any, dict[str, bool]]:
    """Convert a loaded transformers GPT-2 / Llama / Gemma-2 model to a ``HookedTransformer``
    with TransformerLens' own weight conversion functions; returns (model, processing applied).
    ``dtype`` defaults to the HF model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    unknown = set(processing) - set(PROCESSING_KWARGS)
    if unknown:
        raise TypeError(f"unknown processing options {sorted(unknown)}; valid: {PROCESSING_KWARGS}")
    requested = {**NO_PROCESSING, **processing}
    dtype = resolve_dtype(dtype) if dtype is not None else next(hf_model.parameters()).dtype
    device = resolve_device(device)
    cfg_dict = hooked_config_dict(hf_model.config, n_ctx=n_ctx)
    cfg_dict.update(
        model_name=Path(str(getattr(hf_model, "name_or_path", "") or "custom")).name or "custom",
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    if requested["center_unembed"] and cfg.output_logits_soft_cap > 0:
        warnings.warn("center_unembed is not valid under a logit soft cap; skipped", stacklevel=2)
        requested["center_unembed"] = False
    state_dict = _convert_weights(hf_model, cfg)
    with warnings.catch_warnings():  # TL 3.x deprecates HookedTransformer for TransformerBridge
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(cfg, None, move_to_device=False)
    if tokenizer is not None:
        _attach_tokenizer(model, tokenizer)
    model.load_and_process_state_dict(state_dict, **requested)
    model.move_model_modules_to_device()
    return model, _applied_processing(model.cfg, requested)


def _attach_tokenizer(model: Any, tokenizer: Any) -> None:
    """TransformerLens re-loads the tokenizer by name to get a BOS-adding copy, which fails for
    a tokenizer built in memory; fall back to attaching it as it is."""
    try:
        model.set_tokenizer(tokenizer)
    except (KeyError, OSError, ValueError, TypeError):
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def from_tlens(
    model: Any,
    tokenizer: object = None,
    *,
    centered_writing_weights: bool | None = None,
    freeze: bool = True,
) -> TLensAdapter:
    """Wrap an already-loaded ``HookedTransformer``. Whether its writing weights were centred
    is read off the weights unless given."""
    return TLensAdapter(
        model, tokenizer, centered_writing_weights=centered_writing_weights, freeze=freeze
    )


def _official_name(name: str) -> str | None:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def load_tlens(
    name_or_dir: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: object = None,
    n_ctx: int | None = None,
    **kwargs: Any,
) -> TLensAdapter:
    """Load a ``HookedTransformer``. A TransformerLens model name goes through
    ``HookedTransformer.from_pretrained``; a local directory (or any other hub name of a GPT-2,
    Llama or Gemma-2 model) is loaded with transformers and converted with TransformerLens'
    weight conversion functions. Processing switches (``PROCESSING_KWARGS``) default to off;
    other ``kwargs`` go to the loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    processing = {k: bool(kwargs.pop(k)) for k in PROCESSING_KWARGS if k in kwargs}
    requested = {**NO_PROCESSING, **processing}
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    name = str(name_or_dir)
    official = None if Path(name).exists() else _official_name(name)
    if official is not None:
        from transformer_lens import HookedTransformer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(official)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            model = HookedTransformer.from_pretrained(
                name,
                device=str(device),
                dtype=dtype,
                tokenizer=tokenizer,
                n_ctx=n_ctx,
                **requested,
                **kwargs,
            )
        applied = _applied_processing(model.cfg, requested)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        model, applied = hooked_from_hf(
            hf_model, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx, **requested
        )
        del hf_model
    adapter = TLensAdapter(
        model,
        tokenizer,
        processing=applied,
        centered_writing_weights=applied["center_writing_weights"],
    )
    adapter.name = name
    return adapter
