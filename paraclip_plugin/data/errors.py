"""The data layer's error type."""


class InputError(ValueError):
    """Bad input data; the message names the file (and line, sample or member) at fault."""
