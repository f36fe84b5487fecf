"""Input paths that must be regular files: a FIFO, socket or device is named as such, not "missing".

Opening a FIFO blocks until something writes to it, and a device can be endless, so an
input that exists but is not a regular file is refused before it is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from surgery.errors import InputNotFoundError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(path: Path) -> str | None:
    """What `path` is when it exists but is not a regular file ("a FIFO (named pipe)", ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def refuse_special_file(path: Path, error: type[Exception] = InputNotFoundError) -> None:
    """Raise `error` if `path` exists but is a FIFO, socket, device (anything but a regular file
    or a directory); a missing path or a regular file passes."""
    kind = file_kind(path)
    if kind is not None and kind != "a directory":
        raise error(f"{path} is not a regular file (it is {kind}); give the file itself")


def require_regular_file(path: Path, error: type[Exception] = InputNotFoundError) -> None:
    """Raise `error` if `path` exists but is not a regular file (a directory included)."""
    kind = file_kind(path)
    if kind is not None:
        raise error(f"{path} is not a regular file (it is {kind}); give the file itself")
