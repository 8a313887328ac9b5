"""Not built yet."""

from ..errors import DsvError

NAME = "download"


def command() -> None:
    raise DsvError("dsv3 download is not built yet")
