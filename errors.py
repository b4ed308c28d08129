"""The one exception type users see: a one-line message naming the problem and the fix."""


class PertokenError(Exception):
    """A user-facing error. The CLI prints its message on one line, without a traceback."""
