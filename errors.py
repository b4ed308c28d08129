"""The one exception type users see: a one-line message naming the problem and the fix."""


class PertokenError(Exception):
    """A user-facing error. The CLI prints its message on one line, without a traceback."""


class PertokenWarning(UserWarning):
    """A user-facing warning. The CLI prints its message on one line, without a source line."""
