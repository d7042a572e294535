"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into exit code 2 and a short message on stderr, no traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong, where, and how to fix it."""
