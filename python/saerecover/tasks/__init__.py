"""Tasks: the behaviors a clamp suppresses and recovery tries to bring back."""

from saerecover.core.examples import Examples, Task
from saerecover.tasks.ioi import IOI

__all__ = ["IOI", "Examples", "Task"]
