"""The one exception type commands raise for bad input; `app.py` turns it into an exit code."""


class DsvError(Exception):
    """A problem the user can fix: the message names the file, tensor or option and what to do."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(DsvError):
    """Options that contradict each other or are out of range (exit code 2, like click's)."""

    exit_code = 2


class PeerFailure(DsvError):
    """A collective failed because another rank died or stalled: a consequence, not the cause."""

    def __init__(self, message: str, stalled: bool):
        super().__init__(message)
        self.stalled = stalled  # the collective timed out (the peer is alive but made no progress)
