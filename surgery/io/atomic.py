"""Outputs appear whole or not at all.

Everything is written under a temporary name beside the destination and renamed
into place on success (a rename within one directory is atomic). On any error,
including SIGTERM turned into SystemExit by the CLI, the temporary path is removed.
A SIGKILL can leave a hidden `.NAME.surgery-tmp-PID-*` entry but never a partial
destination; such leftovers of dead processes are swept on the next write.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import OutputExistsError

_TMP_MARK = ".surgery-tmp-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(dest: Path) -> None:
    """Remove temporaries that dead processes left beside `dest`."""
    prefix = f".{dest.name}{_TMP_MARK}"
    for leftover in dest.parent.glob(f"{prefix}*"):
        pid_text = leftover.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            _remove(leftover)


def check_output(dest: str | Path, force: bool = False) -> Path:
    """Refuse an existing output unless forced; call before any expensive work."""
    dest = Path(dest)
    if dest.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise OutputExistsError(
            f"output {dest} is the current directory (or one holding it), which is never replaced; "
            "name a new directory for the output, e.g. -o ./out"
        )
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; choose another output path or pass --force to replace it")
    return dest


@contextmanager
def atomic_path(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` if the block succeeds.

    The caller creates a file or a directory at the yielded path. With `force`, an
    existing `dest` is replaced only after the new output is complete.
    """
    dest = check_output(dest, force)
    created: list[Path] = []
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(dest)
    tmp = dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {dest}")
        if dest.exists():
            if not force:
                raise OutputExistsError(f"{dest} appeared while writing; pass --force to replace it")
            trash = dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            _remove(trash)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        for directory in created:
            try:
                directory.rmdir()
            except OSError:
                pass
        raise
