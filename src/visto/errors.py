"""The one exception type that the edges (CLI, server, file readers) turn into a clear message."""


class UserError(Exception):
    """Bad input from a person or a file: the message says what was wrong and what to do.

    The CLI prints it without a traceback and exits with status 2; the server answers 4xx.
    """
