"""Not built yet."""

from ..errors import DsvError

NAME = "estimate-cost"


def command() -> None:
    raise DsvError("dsv3 estimate-cost is not built yet")
