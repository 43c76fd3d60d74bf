"""The evaluation tools. Each one's `__main__` sets `sys.excepthook = print_error`: bad input (BadInput) and a failed
read or write (OSError) end in one line `error: ...` and exit code 1, no traceback; any other error is a bug and keeps
its traceback."""

import sys


class BadInput(ValueError):
    """A problem with a tool's input: one line that names the fix."""


def print_error(kind, error, tb) -> None:
    """sys.excepthook: BadInput and OSError as one line; anything else with its full traceback."""
    if issubclass(kind, BadInput | OSError):
        fix = "check that path and its permissions"
        fix = "a file is where a folder is needed: choose another path" if issubclass(kind, FileExistsError) else fix
        print(f"error: {error}" + ("" if issubclass(kind, BadInput) else f": {fix}"), file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, tb)
