"""The one error type for bad user input.

Anything caused by what a user handed us (a config, a data file, a checkpoint, a CLI argument, a
worker's update that must be rejected loudly) raises :class:`InputError` with a message that names
the file and/or field. The CLI prints it as one line and exits with code 2. Bugs are not caught.
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """Bad user input. ``str(err)`` is a one-line message naming what is wrong and where."""

    def __init__(self, message: str):
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))
