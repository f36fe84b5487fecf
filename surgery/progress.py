"""Progress bars on stderr for loops a person waits for.

Shown when stderr is a terminal (or SURGERY_PROGRESS=1), silent otherwise so that
logs, pipes and tests stay clean. `--json` output on stdout is never touched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.status import Status as RichStatus

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("SURGERY_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a rich progress bar on stderr when a person is watching."""
    if not enabled():
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


class Status:
    """A one-line status (e.g. a running loss) updated in place: `with Status(...) as s: s.update(text)`."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._status: RichStatus | None = None

    def __enter__(self) -> Status:
        if enabled():
            from rich.console import Console

            self._status = Console(stderr=True).status(self.description)
            self._status.__enter__()
        return self

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"{self.description} {text}")

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)
