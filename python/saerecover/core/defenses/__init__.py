"""Defenses: named interventions the recovery engine attacks, one module each, registered in
:data:`DEFENSES` (a new defense is its module plus one line here).

A defense turns the task's clamp (the feature set S at each site and its values) into the
:class:`~saerecover.core.clamp.Clamp` the engine runs. Each site's ``defend(h)`` is the
defended residual, so every projection mode, budget and metric applies unchanged; a defense's
``recovery`` entries are RecoveryConfig fields it needs (``reclamp``: the defense is applied
again after delta, as a defense that acted only before delta would be undone by adding back
what it removed).

    clamp           the clamp as given (one or several sites)
    clamp-reclamp   the clamp, applied again after delta
    error-mean      the SAE error replaced by its mean over a reference set
    error-proj      the SAE error projected off the clamped features' decoder directions
    dir-ablate      the clamped features' decoder directions ablated from the residual
    hardened:R[:k]  the clamp plus an ablated subspace grown from recovered deltas, R rounds
"""

from __future__ import annotations

from collections.abc import Callable

from saerecover.core.defenses.ablation import DirAblate
from saerecover.core.defenses.base import Defense, DefenseContext, orthonormal_basis
from saerecover.core.defenses.clamp import PlainClamp, Reclamp
from saerecover.core.defenses.error import ErrorMean, ErrorProj
from saerecover.core.defenses.hardened import Hardened

#: Defense name -> its factory from the spec's arguments (``hardened:3:4`` -> ("3", "4")).
DEFENSES: dict[str, Callable[..., Defense]] = {
    "clamp": PlainClamp,
    "clamp-reclamp": Reclamp,
    "error-mean": ErrorMean,
    "error-proj": ErrorProj,
    "dir-ablate": DirAblate,
    "hardened": Hardened.from_spec,
}


def parse_defense(spec: str) -> Defense:
    """A defense from its spec: a name of :data:`DEFENSES`, with ``:``-separated arguments
    (``hardened:3``, ``hardened:3:4``). Raises ValueError naming the bad spec."""
    name, *args = str(spec).strip().split(":")
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {spec!r}; valid: {', '.join(DEFENSES)} (hardened takes :ROUNDS[:K])")
    try:
        return DEFENSES[name](*args)
    except TypeError:
        raise ValueError(f"defense {spec!r} takes no such arguments") from None


def parse_defenses(specs: str | list[str]) -> list[Defense]:
    """Comma-separated specs (or a list) as distinct defenses, in order."""
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise ValueError("give at least one defense")
    out = [parse_defense(s) for s in items]
    labels = [d.label for d in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"defenses repeat: {labels}")
    return out


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DirAblate", "ErrorMean", "ErrorProj", "Hardened", "PlainClamp",
           "Reclamp", "orthonormal_basis", "parse_defense", "parse_defenses"]
