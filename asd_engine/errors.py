"""User-facing errors.

Every error a user can fix is a :class:`UserInputError`: it names the input that is wrong and says what to do
instead. The engine names inputs by their config field or input name (``distill.gamma``, ``resume``) and writes
``{=name}`` where its fix mentions another; each front door renders the message with its own names (the CLI's
flags, the nodes' widgets: :func:`asd_engine.runs.settings.flag_of` / ``widget_of``) as one line.
"""

from __future__ import annotations

import re
from typing import Callable

_NAME = re.compile(r"\{=([A-Za-z_][A-Za-z0-9_.]*)\}")


class UserInputError(ValueError):
    """Bad input from a user: ``input_name`` is the field or input, ``fix`` is what to do instead."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(self.render())

    def render(self, name_of: Callable[[str], str] = lambda name: name) -> str:
        """``input: problem; fix`` with every input named by ``name_of``."""
        fix = _NAME.sub(lambda m: name_of(m.group(1)), self.fix)
        return f"{name_of(self.input_name)}: {self.problem}; {fix}"


class TrainingDiverged(RuntimeError):
    """A run whose loss or state stopped being finite: it stops at once, and no checkpoint of that state is written
    (the last one stays). Front doors print ``str(exc)`` as one line."""

    def __init__(self, step: int, what: str) -> None:
        self.step, self.what = step, what
        super().__init__(f"training diverged at step {step}: {what}; the last checkpoint written before it is kept "
                         "(resume from it with a lower learning rate, or start again with another seed)")
