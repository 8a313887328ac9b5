"""Not built yet."""

from ..errors import DsvError

NAME = "profile-experts"


def command() -> None:
    raise DsvError("dsv3 profile-experts is not built yet")
