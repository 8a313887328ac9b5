"""Not built yet."""

from ..errors import DsvError

NAME = "tiny"


def command() -> None:
    raise DsvError("dsv3 tiny is not built yet")
