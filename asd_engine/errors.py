"""User-facing errors.

Every error a user can fix is a :class:`UserInputError`: it names the input that is wrong and says what to do
instead. The CLI prints it as one line (no traceback) and ComfyUI nodes re-raise it with the same text.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from a user: ``input_name`` is the CLI flag or node input, ``fix`` is what to do instead."""

    def __init__(self, input_name: str, problem: str, fix: str) -> None:
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
        super().__init__(f"{input_name}: {problem}; {fix}")
