"""The one exception the data layer raises for a missing, corrupted or refused data file."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, malformed, fails its checksum, or an archive is unsafe.

    The message is one line that names the file (and, for a missing file, where to put it), so the
    command-line tool can print it as is and exit with status 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


__all__ = ["DataError"]
