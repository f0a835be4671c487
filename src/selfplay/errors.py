"""The exception types the command line turns into a one-sentence error."""


class SelfplayError(Exception):
    """A user-facing error: the message names the file, row or option at fault."""


class UserCodeError(SelfplayError):
    """A user's own code (a `module:function` judge) failed: its traceback (`detail`) is
    shown, then our sentence saying where it was called."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail
