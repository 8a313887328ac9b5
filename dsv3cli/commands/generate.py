"""Not built yet."""

from ..errors import DsvError

NAME = "generate"


def command() -> None:
    raise DsvError("dsv3 generate is not built yet")
