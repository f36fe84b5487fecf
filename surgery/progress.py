"""Progress on stderr for loops a person waits for.

Three modes, picked by `mode()`:
- "bar": rich progress bars and spinners, when stderr is a terminal;
- "lines": when stderr is a pipe or a file, plain lines with no terminal codes, one when a
  stage ends (`merge: 12/12 in 3.4 s`) and one at least every `LINE_INTERVAL` seconds
  while it runs, so that a log shows where a long run is;
- "off": nothing.
`SURGERY_PROGRESS` overrides the choice: `0` (off), `1` (bar), `lines`. `--json` output on
stdout is never touched.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.status import Status as RichStatus

T = TypeVar("T")

LINE_INTERVAL = 30.0
"""Seconds between the lines a running stage prints in "lines" mode."""


def mode() -> str:
    """"bar", "lines" or "off" for the current stderr and `SURGERY_PROGRESS`."""
    flag = os.environ.get("SURGERY_PROGRESS")
    if flag is not None:
        flag = flag.strip().lower()
        if flag in ("0", "", "false", "off"):
            return "off"
        if flag == "lines":
            return "lines"
        return "bar"
    return "bar" if sys.stderr.isatty() else "lines"


def enabled() -> bool:
    """Whether progress is shown at all (as bars or as lines)."""
    return mode() != "off"


def _line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _count(done: int, total: int | None) -> str:
    return f"{done}/{total}" if total is not None else str(done)


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with progress on stderr: a rich bar on a terminal, plain lines in a pipe."""
    shown = mode()
    if shown == "off":
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if shown == "lines":
        yield from _track_lines(iterable, total, description or "progress")
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


def _track_lines(iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_INTERVAL and (total is None or done < total):
            share = f" ({100 * done / total:.0f}%)" if total else ""
            _line(f"{description}: {_count(done, total)}{share} after {now - start:.1f} s")
            last = now
    _line(f"{description}: {_count(done, total)} in {time.perf_counter() - start:.1f} s")


class Status:
    """A one-line status (e.g. a running loss) updated in place: `with Status(...) as s: s.update(text)`.

    In "lines" mode the latest text is printed at least every `LINE_INTERVAL` seconds and
    once at the end."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._status: RichStatus | None = None
        self._mode = "off"
        self._text = ""
        self._start = self._last = 0.0

    def __enter__(self) -> Status:
        self._mode = mode()
        self._start = self._last = time.perf_counter()
        if self._mode == "bar":
            from rich.console import Console

            self._status = Console(stderr=True).status(self.description)
            self._status.__enter__()
        return self

    def update(self, text: str) -> None:
        """Show `text` after the description."""
        self._text = text
        if self._status is not None:
            self._status.update(f"{self.description} {text}")
        elif self._mode == "lines":
            now = time.perf_counter()
            if now - self._last >= LINE_INTERVAL:
                _line(f"{self.description} {text} after {now - self._start:.1f} s")
                self._last = now

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)
        elif self._mode == "lines":
            text = f" {self._text}" if self._text else ""
            _line(f"{self.description}{text} in {time.perf_counter() - self._start:.1f} s")
