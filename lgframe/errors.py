"""One exception type for errors a user can act on.

The CLI prints these as a single paragraph and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""


class LgframeError(Exception):
    """A user-facing error: the message says what was wrong, what is valid and
    where it came from (recipe key, file, tensor name)."""
