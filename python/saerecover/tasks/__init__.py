"""Tasks: the behaviors a clamp suppresses and recovery tries to bring back."""

from .base import Examples, Task
from .ioi import IOI

__all__ = ["IOI", "Examples", "Task"]
