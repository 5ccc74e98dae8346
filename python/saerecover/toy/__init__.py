"""The toy world: a tiny GPT-2-style model trained on a synthetic corpus, with SAEs on its
residual stream, shipped in the package so that the whole method runs on a laptop CPU.

It loads through exactly the same code paths as real models (HF ``from_pretrained`` on a local
directory, ``sae_lens.SAE.load_from_disk``). Retrain with ``python -m saerecover.toy.train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saerecover.core.sites import load_site
from saerecover.data import toy_corpus as corpus
from saerecover.models import load_model
from saerecover.tasks.ioi import IOI

ASSETS = Path(__file__).resolve().parent / "assets"

#: The demo's setting (``saerecover demo``): toy IOI, features by attribution at layer 1.
DEMO_OPTIONS: dict[str, Any] = {
    "model": str(ASSETS / "model"),
    "sae": str(ASSETS / "saes" / "blocks.1.hook_resid_post"),
    "hook": "blocks.1.hook_resid_post",
    "n": 160,
    "patterns": "BABA,ABBA",
    "ioi_prompts": "toy",
    "top_k": 16,
    "clamp_mode": "set",
    "clamp_value": -5.0,
    "clamp_where": "active",
    "modes": "none,encoder",
    "steps": 100,
    "lr": 0.1,
    "budget": 20.0,
    #: C4 relative to the residual: ||delta|| <= 0.25 x ||h_def|| at the answer row (about 5 on the
    #: toy, whose answer-row residual norm is about 21: the absolute 20 would be 95% of it)
    "budget_rel": 0.25,
    "batch_size": 64,
}


def assets_path() -> Path:
    if not (ASSETS / "model").is_dir():
        raise FileNotFoundError(
            f"the toy world's weights are missing from {ASSETS}; reinstall saerecover or "
            "retrain them with `python -m saerecover.toy.train --out <dir>`"
        )
    return ASSETS


@dataclass
class ToyWorld:
    """The loaded toy world: ``model`` (a ModelAdapter), its tokenizer, and its SAE sites."""

    model: Any
    root: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    _sites: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def site_names(self) -> list[str]:
        return sorted(p.name for p in (self.root / "saes").iterdir() if (p / "cfg.json").exists())

    def site(self, hook_name: str | None = None) -> Any:
        """The SAE site at ``hook_name`` (default: the demo's layer-1 site)."""
        name = hook_name or DEMO_OPTIONS["hook"]
        if name not in self._sites:
            path = self.root / "saes" / name
            if not path.is_dir():
                raise ValueError(f"the toy world has no SAE at {name!r}; available: {', '.join(self.site_names())}")
            self._sites[name] = load_site(path, hook_name=name, model=self.model)
        return self._sites[name]

    def ioi_task(self, n: int = 256, seed: int = 0, patterns: Any = ("BABA", "ABBA")) -> Any:
        """Toy IOI: the corpus's own templates and names."""
        return IOI(self.tokenizer, n=n, seed=seed, patterns=tuple(patterns), templates=corpus.IOI_TEMPLATES,
                   names=corpus.NAMES, places=corpus.IOI_PLACES, objects=corpus.IOI_OBJECTS, name="toy-ioi")


def load(*, backend: str = "hf", device: str | None = None, dtype: Any = None) -> ToyWorld:
    """Load the shipped toy model (``backend`` "hf" or "tlens") and its SAEs."""
    root = assets_path()
    model = load_model(str(root / "model"), backend=backend, device=device, dtype=dtype)
    metrics_file = root / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return ToyWorld(model=model, root=root, metrics=metrics)
