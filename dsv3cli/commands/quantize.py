"""Not built yet."""

from ..errors import DsvError

NAME = "quantize"


def command() -> None:
    raise DsvError("dsv3 quantize is not built yet")
