"""saerecover: stress-test SAE feature interventions by post-intervention recovery.

>>> import saerecover as sr
>>> world = sr.toy.load()
>>> site = world.site("blocks.1.hook_resid_post")
>>> task = world.ioi_task(n=256)
>>> features = sr.select_by_attribution(world.model, site, task, task.examples(), top_k=16)
>>> clamp = sr.Clamp({site: features}, value=-5.0, where="active")
>>> run = sr.recover(world.model, clamp, task, projection=["none", "encoder"], out="runs/toy-ioi")
>>> print(run.table())

Heavy modules (torch, transformers, sae_lens) load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("saerecover")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

_LAZY = {
    "Clamp": "clamp",
    "Site": "sites",
    "load_site": "sites",
    "load_model": "models",
    "recover": "pipeline",
    "find_flips": "pipeline",
    "RunResult": "pipeline",
    "DefendedModel": "defense",
    "attribute": "attribution",
    "budget_sweep": "sweeps",
    "feature_sweep": "sweeps",
    "RecoveryConfig": "recovery",
    "select_by_attribution": "features",
    "attribution_scores": "features",
    "IOI": "tasks",
    "EncoderNullProjector": "linalg",
    "jacobian_null_project": "linalg",
}
_SUBMODULES = ("linalg", "toy", "tasks", "models", "metrics", "stats", "runs", "report", "analysis", "merge", "sweeps",
               "collection", "attribution", "refusal", "cli")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'saerecover' has no attribute {name!r}")
