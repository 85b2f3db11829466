"""The one exception type that means "the user's input is wrong" (as opposed to a bug).

The CLI prints an OpdError as one line and exits non-zero without a traceback; anything else
is a bug and keeps its traceback.
"""


class OpdError(Exception):
    """A bad input or a refused action, with a message that names the cause."""
