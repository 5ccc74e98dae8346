"""Baselines: ways to recover a valid flip other than a residual delta at the clamped sites.

A baseline is a mode of a run like the projection modes: :func:`saerecover.recover` runs it on
the same valid flips after them, writes its records and tensors through the same run
directory, and summarises it with them. :data:`BASELINES` registers each by name, so a new
baseline is one module plus one entry there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.examples import Examples, Task
from saerecover.core.recovery import ExampleOutcome
from saerecover.experiments.suffix import SuffixSettings


class Baseline(Protocol):
    """Recovers a batch of valid flips of ``task`` under ``defended``'s clamp."""

    #: metadata saved with each example's tensors (None: none)
    tensor_metadata: Mapping[str, str] | None

    def recover(self, defended: DefendedModel, task: Task, ex: Examples, *,
                cfg: RecoveryConfig) -> list[ExampleOutcome]: ...

    def to_dict(self) -> dict[str, Any]: ...


#: The baselines by name (the ``--modes`` word), each built from its settings.
BASELINES: dict[str, type] = {
    "suffix": SuffixSettings,
}
