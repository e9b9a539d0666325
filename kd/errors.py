"""Errors that kdflow reports as one line to the user.

`InputError` is bad input (config, data, arguments, weights): the CLI prints its
message on one line and exits with code 2. `GateRejected` exits with code 3.
"""


class InputError(ValueError):
    """Bad input from the user: a config field, a data file, a name, a weights file."""


class GateRejected(RuntimeError):
    """The promotion gate said no."""
