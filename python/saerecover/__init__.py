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

#: Public names, each from the module that defines it (imported on first use: ``import
#: saerecover`` stays cheap and loads neither torch nor transformers).
_LAZY = {
    "Clamp": "core.clamp",
    "Site": "core.sites",
    "load_site": "core.sites",
    "load_model": "models",
    "recover": "experiments.pipeline",
    "find_flips": "experiments.pipeline",
    "RunResult": "experiments.pipeline",
    "DefendedModel": "core.defended",
    "attribute": "experiments.attribution",
    "budget_sweep": "experiments.sweeps",
    "feature_sweep": "experiments.sweeps",
    "LocalExecutor": "experiments.executor",
    "RayExecutor": "experiments.ray_executor",
    "RecoveryConfig": "core.config",
    "select_by_attribution": "core.selection",
    "attribution_scores": "core.selection",
    "IOI": "tasks.ioi",
    "EncoderNullProjector": "linalg",
    "jacobian_null_project": "linalg",
}
#: Modules reachable as attributes (``sr.runs``, ``sr.metrics``), by short name.
_SUBMODULES = {
    "linalg": "linalg", "toy": "toy", "tasks": "tasks", "models": "models", "data": "data", "core": "core",
    "runs": "runs", "report": "report", "experiments": "experiments", "cli": "cli",
    "metrics": "core.metrics", "stats": "runs.stats", "collection": "runs.collection",
    "analysis": "experiments.analysis", "merge": "experiments.merge", "sweeps": "experiments.sweeps",
    "attribution": "experiments.attribution", "refusal": "experiments.refusal",
}

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    raise AttributeError(f"module 'saerecover' has no attribute {name!r}")
