"""keyedge's own error types.

Every failure caused by bad input (a corrupted key file, an image whose size
the block size does not divide, an unwritable output path...) is raised as a
:class:`KeyedgeError`.  The CLI prints it as one line and exits with code 2;
library users can catch the one base class.
"""

from __future__ import annotations


class KeyedgeError(Exception):
    """Base class: a problem with the user's input, with a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line: "what is wrong: how to fix it"
        return f"{self.message}; {self.hint}" if self.hint else self.message


class KeyFileError(KeyedgeError):
    """A key file is missing, unreadable, truncated, corrupted, foreign or from a newer version."""


class ShapeError(KeyedgeError):
    """An input's shape does not fit the transform (e.g. the block size does not divide it)."""


class FoldError(KeyedgeError):
    """Folding the shuffle into a model's first layer would not be exact."""


class ImageError(KeyedgeError):
    """An image file cannot be read or written."""


class OutputError(KeyedgeError):
    """An output path exists, or cannot be written."""


class DependencyError(KeyedgeError):
    """An optional dependency is missing; the hint names the extra to install."""


class DataError(KeyedgeError):
    """A dataset is missing, malformed, or cannot be downloaded."""


class SealError(KeyedgeError):
    """A sealed artifact cannot be opened: wrong sealing key, another artifact set, or tampering."""
