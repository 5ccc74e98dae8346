"""A site: a residual hook name plus the sae_lens SAE that reads it.

The site owns the SAE's input conventions (dtype, centring of the residual for SAEs trained on
TransformerLens models loaded with ``center_writing_weights=True``), so that everything above it
can speak of "the features at this site" without caring how the SAE was trained.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: sae_lens normalisations under which the encoder's pre-activation is an affine map of the
#: residual, so that C1 (A_S^T delta = 0) pins the clamped pre-activations exactly.
AFFINE_NORMALIZATIONS = ("none", "expected_average_only_in")


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it already is: metrics and deltas never run in bf16/fp16."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass(eq=False)
class Site:
    """A residual site ``hook_name`` read by ``sae``.

    center_input: subtract each token's mean over d_model before encoding (the convention of
    SAEs trained on TransformerLens residuals with ``center_writing_weights=True``, such as
    ``gpt2-small-res-jb``, when the model backend did not centre the weights itself).
    """

    hook_name: str
    sae: Any  # sae_lens.SAE
    center_input: bool = False
    source: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    # -- shape and identity -------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return str(self.sae.cfg.architecture())

    @property
    def is_affine_encoder_input(self) -> bool:
        """True when the encoder pre-activation is affine in the residual (C1 is then exact)."""
        return str(self.sae.cfg.normalize_activations) in AFFINE_NORMALIZATIONS

    @property
    def neuronpedia_id(self) -> str | None:
        """The SAE's Neuronpedia id (``MODEL/SAE_ID``, e.g. ``gpt2-small/4-res-jb``) from its
        sae_lens metadata (``cfg.metadata.neuronpedia_id``: set for pretrained releases that
        have one, or in a local SAE's cfg.json); None when it has none."""
        value = getattr(getattr(self.sae.cfg, "metadata", None), "neuronpedia_id", None)
        return str(value) if isinstance(value, str) and value.strip() else None

    def __hash__(self) -> int:
        return hash((self.hook_name, id(self.sae)))

    def __repr__(self) -> str:
        return f"Site({self.hook_name!r}, {self.architecture}, d_sae={self.d_sae})"

    # -- checks --------------------------------------------------------------------------
    def check_features(self, features: torch.Tensor) -> torch.Tensor:
        """Validate a feature index list: 1-D integers, in range, no duplicates."""
        try:
            features = torch.as_tensor(features)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"feature indices for site {self.hook_name!r} must be a list or 1-D "
                            f"tensor of integers, got {features!r:.80}") from err
        if features.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(
                f"feature indices for site {self.hook_name!r} must be integers, got {features.dtype}"
            )
        if features.ndim > 1:
            raise ValueError(f"feature indices for site {self.hook_name!r} must be 1-D, got shape "
                             f"{tuple(features.shape)}")
        features = features.to(torch.long).reshape(-1)
        if features.numel() == 0:
            return features
        lo, hi = int(features.min()), int(features.max())
        if lo < 0 or hi >= self.d_sae:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"feature index {bad} is out of range for site {self.hook_name!r} "
                f"(SAE width d_sae={self.d_sae}; valid indices 0..{self.d_sae - 1})"
            )
        if torch.unique(features).numel() != features.numel():
            dup = sorted({int(i) for i in features if int((features == i).sum()) > 1})
            raise ValueError(f"duplicate feature indices for site {self.hook_name!r}: {dup}")
        return features

    def check_model_width(self, d_model: int, model_name: str = "the model") -> None:
        if d_model != self.d_in:
            raise ValueError(
                f"SAE width does not match the model: the SAE at {self.hook_name!r} reads "
                f"d_in={self.d_in} but {model_name} has d_model={d_model}"
            )

    # -- the SAE, in the residual's coordinates ------------------------------------------
    def sae_input(self, h: torch.Tensor) -> torch.Tensor:
        """The residual as the SAE expects it: centred if needed, in the SAE's dtype."""
        x = h.to(self.sae.dtype)
        if self.center_input:
            x = x - x.mean(dim=-1, keepdim=True)
        return x

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations z = E(h), float32 or better. h: (..., d_model) -> (..., d_sae)."""
        return at_least_f32(self.sae.encode(self.sae_input(h)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction D(z) in residual coordinates, float32 or better. (..., d_sae) -> (..., d_model)."""
        return at_least_f32(self.sae.decode(z.to(self.sae.dtype)))

    def decode_features(self, dz_s: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """D_S(dz_S): the decoder directions of ``features`` weighted by dz_S, float32.

        dz_s: (..., |S|) -> (..., d_model). Linear part of the decoder only (no bias).
        """
        w = self.sae.W_dec[features].float()
        return dz_s.float() @ w

    def encoder_columns(self, features: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A_S: the encoder columns of ``features`` as seen from the residual, (d_model, |S|).

        Includes the site's input map (centring), so that A_S^T delta = 0 (C1) is exactly the
        condition under which the clamped pre-activations do not move.
        """
        key = ("A", tuple(int(i) for i in features.tolist()), dtype)
        if key not in self._cache:
            a = self.sae.W_enc.detach()[:, features.to(self.sae.W_enc.device)].to("cpu", dtype)
            if self.center_input:
                a = a - a.mean(dim=0, keepdim=True)
            self._cache[key] = a
        return self._cache[key]


def _wants_centering(sae: Any) -> bool:
    kwargs = getattr(getattr(sae.cfg, "metadata", None), "model_from_pretrained_kwargs", None)
    return bool((kwargs or {}).get("center_writing_weights", False))


def check_sae_source(spec: Any) -> Path | None:
    """The local SAE directory ``spec`` names (None for 'RELEASE/ID'); FileNotFoundError for a
    local path that does not exist, is a file or has no cfg.json, ValueError for anything else."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"SAE must be a local directory, 'RELEASE/ID' or an sae_lens SAE, got {type(spec).__name__}")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(
                f"{path} is not an SAE directory: it has no cfg.json (expected sae_lens "
                "format: cfg.json + sae_weights.safetensors)"
            )
        return path
    if path.exists() or isinstance(spec, Path) or text.startswith(("/", "./", "../", "~")):
        what = "is a file, not" if path.exists() else "does not exist; expected"
        raise FileNotFoundError(
            f"SAE {text} {what} an SAE directory (sae_lens format: cfg.json + "
            "sae_weights.safetensors), or give 'RELEASE/ID' for a pretrained SAE"
        )
    if "/" not in text or text.startswith("/") or text.endswith("/"):
        raise ValueError(
            f"SAE {text!r} is neither a local directory nor 'RELEASE/ID' "
            "(e.g. 'gpt2-small-res-jb/blocks.4.hook_resid_pre')"
        )
    return None


def load_site(
    spec: str | Path | Any,
    *,
    hook_name: str | None = None,
    model: Any = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
) -> Site:
    """Load the SAE for a site.

    spec: an ``sae_lens.SAE`` instance, a local directory (``SAE.load_from_disk``), or
    ``"RELEASE/ID"`` (``SAE.from_pretrained``; the id may itself contain slashes, the release
    is everything before the first one, as in ``gpt2-small-res-jb/blocks.4.hook_resid_pre``).
    hook_name: the residual site; defaults to the SAE's own ``metadata.hook_name``.
    model: a ModelAdapter; when given, the SAE is moved to its device, its width is checked,
    and centring is applied if the SAE expects centred residuals the backend does not give.
    """
    from sae_lens import SAE

    device = str(device if device is not None else (model.device if model is not None else "cpu"))
    source = ""
    if isinstance(spec, SAE):
        sae = spec.to(device)
        source = "<in-memory SAE>"
    else:
        path = check_sae_source(spec)
        with warnings.catch_warnings():
            # sae_lens advises loading the model with the SAE's model_from_pretrained_kwargs;
            # the site applies them itself (centring, below), so the advice is noise here
            warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs", category=UserWarning)
            if path is not None:
                sae = SAE.load_from_disk(path, device=device, dtype=dtype)
                source = str(path.resolve())
            else:
                text = str(spec)
                release, sae_id = text.split("/", 1)
                sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
                source = text
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    name = hook_name or getattr(sae.cfg.metadata, "hook_name", None)
    if not name:
        raise ValueError("the SAE config names no hook; pass hook_name='blocks.L.hook_resid_pre'")
    backend_centred = bool(getattr(model, "centered_writing_weights", False))
    site = Site(hook_name=name, sae=sae, center_input=_wants_centering(sae) and not backend_centred,
                source=source)
    if model is not None:
        if name not in model.site_names():
            raise ValueError(
                f"unknown hook name {name!r} for this model; valid sites: "
                f"{', '.join(model.site_names()[:4])}, ... {model.site_names()[-1]}"
            )
        site.check_model_width(model.d_model)
    return site
