"""One exception type for bad user input, so the CLI can print one line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""
