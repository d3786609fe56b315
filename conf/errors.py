"""The one exception type that user-facing code raises for bad input.

`train.py` prints it as a single `error: ...` line (no traceback) and exits with status 2, so every
message must name the problem *and* the fix.
"""


class DraftsmithError(Exception):
    """Bad input or configuration; the message says what is wrong and how to fix it."""


class Interrupted(DraftsmithError):
    """Ctrl-C in a long stage: nothing is wrong, so train.py prints the message alone (where it stopped, and
    that rerunning the same command resumes) and exits with status 130, the shell's code for SIGINT."""
