"""The one error type for bad user input.

Anything caused by what a user handed us (a config, a data file, a checkpoint, a CLI argument, a
worker's update that must be rejected loudly) raises :class:`InputError` with a message that names
the file and/or field. The CLI prints it as one line and exits with code 2. Bugs are not caught.
"""

from __future__ import annotations

from typing import Any

EXIT_INPUT_ERROR = 2


def shown_input(value: Any) -> str:
    """`` (got X)`` after a validation message that does not say what it got; nothing for a whole
    mapping or list (the field path already points into it) or a missing value."""
    return "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"


class InputError(Exception):
    """Bad user input. ``str(err)`` is a one-line message naming what is wrong and where."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))
