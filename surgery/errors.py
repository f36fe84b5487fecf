"""One exception family for everything a user can get wrong.

A `SurgeryError` is bad input: the CLI prints its message on one line and exits 2.
Any other exception is an internal error (exit 1). Messages say what was wrong
and what to do about it.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Bad input or a refused operation; the message tells the user what to do."""


class InputNotFoundError(SurgeryError):
    """A file or directory the user named does not exist or cannot be read."""


class CorruptFileError(SurgeryError):
    """A file exists but is not valid (truncated header, bad JSON, wrong format)."""


class UnsafePathError(SurgeryError):
    """An index or config names a file outside the directory it belongs to."""


class PickleRefusedError(SurgeryError):
    """A pickle checkpoint was found and --allow-pickle was not given."""


class MismatchError(SurgeryError):
    """Two inputs do not fit together (adapter keys or shapes vs the base)."""


class OutputExistsError(SurgeryError):
    """The output path exists and --force was not given."""


class OutputOverlapsInputError(SurgeryError):
    """The output path is an input, contains one or lies inside one (--force never allows it)."""


class NonFiniteError(SurgeryError):
    """A computed tensor holds NaN or Inf."""


class DataError(SurgeryError):
    """A JSONL data file is empty, malformed or missing fields."""
