"""Outputs appear whole or not at all.

Everything is written under a temporary name beside the destination and renamed
into place on success (a rename within one directory is atomic). On any error,
including SIGTERM turned into SystemExit by the CLI, the temporary path is removed.
A SIGKILL can leave a hidden `.NAME.surgery-tmp-PID-*` entry but never a partial
destination; such leftovers of dead processes are swept on the next write.

Inputs are never touched: every command names its input paths, and an output that is
one of them, contains one or lies inside one is refused before anything else, `--force`
or not (`check_output`). Every file of an output gets the same mode, the usual default
0666 (directories 0777) less the umask, whatever library wrote it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgery.errors import OutputExistsError, OutputOverlapsInputError

PathLike = str | os.PathLike[str]
# role -> a path, several, an opened Checkpoint/LoraAdapter (anything with `files`/`directory`) or None
InputPaths = Mapping[str, Any] | Iterable[Any]
"""A command's input paths: a mapping role -> path(s) (the role names them in messages, e.g.
`{"MODEL": model, "--calib": calib}`), or a plain iterable of paths; `None` entries are ignored.
An opened `Checkpoint` or `LoraAdapter` may stand in for its paths."""

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


def _paths(value: object) -> list[Path]:
    """The paths one input stands for: a path, several, or an opened checkpoint or adapter
    (anything with `files` and/or `directory`)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if hasattr(value, "directory") or hasattr(value, "files"):
        return _paths(getattr(value, "files", None)) + _paths(getattr(value, "directory", None))
    return [p for item in value for p in _paths(item)]  # type: ignore[attr-defined]


def _roles(inputs: InputPaths) -> list[tuple[str, Path]]:
    """Flatten `inputs` into (role, path) pairs, dropping `None`."""
    items = inputs.items() if isinstance(inputs, Mapping) else (("input", p) for p in inputs)
    return [(role, path) for role, value in items for path in _paths(value)]


def _linked_targets(directory: Path) -> list[Path]:
    """Where the symlinked entries of an input directory point (a Hugging Face cache snapshot
    links each file into `blobs/`): those files are inputs too."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return [Path(e.path).resolve() for e in entries if e.is_symlink()]


def check_no_overlap(dest: str | Path, inputs: InputPaths) -> None:
    """Refuse an output that resolves (symlinks followed) to an input, is an ancestor of
    one, or lies inside one: writing it would replace or delete the input."""
    dest = Path(dest)
    out = dest.resolve()
    shown = str(dest) if out == dest else f"{dest} (that is {out})"
    for role, given in _roles(inputs):
        source = given.resolve()
        for target in [source, *(_linked_targets(source) if source.is_dir() else [])]:
            if out == target or (out.exists() and target.exists() and os.path.samefile(out, target)):
                relation = "is"
            elif out in target.parents:
                relation = "contains"
            elif target in out.parents:
                relation = "lies inside"
            else:
                continue
            what = f"the input {role} {given}" if target == source else f"{target}, a file of the input {role} {given}"
            raise OutputOverlapsInputError(
                f"output {shown} {relation} {what}; inputs are never modified, --force included: "
                "choose an output path outside every input"
            )


def check_output(dest: str | Path, force: bool, inputs: InputPaths) -> Path:
    """Refuse an output that overlaps an input (always) or exists (unless `force`).

    Call before any expensive work, with every input path of the command.
    """
    dest = Path(dest)
    check_no_overlap(dest, inputs)
    if dest.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise OutputExistsError(
            f"output {dest} is the current directory (or one holding it), which is never replaced; "
            "name a new directory for the output, e.g. -o ./out"
        )
    if (dest.exists() or dest.is_symlink()) and not force:
        raise OutputExistsError(f"{dest} already exists; choose another output path or pass --force to replace it")
    return dest


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_modes(path: Path) -> None:
    """Give `path` and everything under it the default modes: 0666 & ~umask for files,
    0777 & ~umask for directories (libraries that write through `tempfile` leave 0600)."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), file_mode)


@contextmanager
def atomic_path(dest: str | Path, force: bool, inputs: InputPaths) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` if the block succeeds.

    The caller creates a file or a directory at the yielded path. With `force`, an
    existing `dest` is replaced only after the new output is complete. `inputs` are
    checked again here (`check_output`), so no writer replaces an input.
    """
    dest = check_output(dest, force, inputs)
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
        normalize_modes(tmp)
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
