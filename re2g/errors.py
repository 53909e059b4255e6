"""Errors re2g raises for bad input: each names where the problem is and what was expected."""

from __future__ import annotations


class Re2GError(Exception):
    """Base class for every error re2g raises on purpose."""


class ConfigError(Re2GError):
    """A configuration file or override is invalid (the message names the field and the value)."""


class DataFormatError(Re2GError):
    """A data file is malformed.

    The message reads ``path:line: field 'name': reason`` so a user can open the file at the line.
    ``line`` is 1-based (a row number for tabular files); ``None`` when the problem is the whole file.
    """

    def __init__(self, path: str, reason: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{reason}")


class ArtifactError(Re2GError):
    """An artifact (index, model directory, run directory) is missing, incomplete, corrupt or
    does not belong with the other pieces it is used with."""
