"""The exceptions that end a command without a traceback.

The CLI turns UserError into exit code 2 and a short message on stderr, and Ctrl-C (KeyboardInterrupt, or
Stopped where a command stopped cleanly itself) into exit code 130 and one line.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""


class Stopped(Exception):
    """The user stopped a command (Ctrl-C) and it left its outputs consistent: the message says how to go on."""
