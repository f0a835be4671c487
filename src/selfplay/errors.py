"""The one exception type the command line turns into a one-sentence error."""


class SelfplayError(Exception):
    """A user-facing error: the message names the file, row or option at fault."""
