"""Errors that mean "the user asked for something wrong", as opposed to bugs.

A `UserError` is reported as one line (no traceback) and a non-zero exit by the stage runner.
Its message names the bad key, file or value and, where possible, what would be accepted.
"""


class UserError(Exception):
    """A mistake in params, paths or input data; the message is shown to the user as is."""


class ParamsError(UserError):
    """params.yaml (or an override) holds an unknown key or a value of the wrong type/range."""


class DataError(UserError):
    """Input data is missing, unreadable, empty or inconsistent."""
