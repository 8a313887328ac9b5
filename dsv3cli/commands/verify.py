"""Not built yet."""

from ..errors import DsvError

NAME = "verify"


def command() -> None:
    raise DsvError("dsv3 verify is not built yet")
