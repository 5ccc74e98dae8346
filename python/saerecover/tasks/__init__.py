"""Tasks: the behaviors a clamp suppresses and recovery tries to bring back (IOI, TPP,
unlearning, refusal). A task gives examples, a behavior score and a recovery loss
(:class:`saerecover.core.examples.Task`); its data comes from :mod:`saerecover.data`.

:data:`TASKS` lists the tasks a finished run can be rebuilt from (``describes(desc)`` and
``from_config(model, desc, **context)`` on the class): adding one is one entry there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saerecover.core.examples import Examples, Task
from saerecover.tasks.ioi import IOI
from saerecover.tasks.refusal.task import Refusal

#: Tasks that a run's ``config["task"]`` rebuilds (see :func:`task_from_config`).
TASKS: tuple[type, ...] = (IOI, Refusal)


def task_from_config(model: Any, desc: Mapping[str, Any], **context: Any) -> Task:
    """The task a run's ``config["task"]`` describes, for ``model`` (its tokenizer). ``context``:
    what a task needs besides its config (refusal: ``requests=``, texts matched by hash)."""
    for cls in TASKS:
        if cls.describes(desc):
            return cls.from_config(model, desc, **context)
    raise ValueError(f"this run's task ({desc.get('name', 'unnamed')!r}) cannot be rebuilt from its config; "
                     f"rebuildable: {', '.join(c.__name__ for c in TASKS)}; for others use the Python API "
                     "(saerecover.attribute on the run's outcomes)")


__all__ = ["IOI", "TASKS", "Examples", "Refusal", "Task", "task_from_config"]
