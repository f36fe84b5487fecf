"""JSONL data files: one JSON object a line, each checked for the string fields a caller needs.

Calibration, fine-tuning, evaluation and corpus files all go through `read_jsonl`, so every
command reports a bad data file the same way: a `DataError` naming the file and line.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surgery.errors import DataError
from surgery.io.paths import file_kind


def read_jsonl(path: str | Path, fields: Sequence[str] = ("prompt",), limit: int | None = None) -> list[dict[str, Any]]:
    """Objects of a JSONL file, each checked to carry string `fields`; blank lines are skipped.

    Stops after `limit` records (lines after that are not read). Raises `DataError`.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise DataError(f"the number of samples must be positive, got {limit}")
    if not path.exists():
        raise DataError(f"{path} does not exist; give a JSONL file with one {_shape(fields)} object a line")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a JSONL file with one {_shape(fields)} object a line")
    kind = file_kind(path)
    if kind is not None:
        raise DataError(f"{path} is not a regular file (it is {kind}); give a JSONL file")
    records: list[dict[str, Any]] = []
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if limit is not None and len(records) >= limit:
                    break
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]  # a UTF-8 byte order mark, as some editors save
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line); "
                        "save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                records.append(_record(path, lineno, line, fields))
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror})") from None
    if not records:
        raise DataError(f"{path} holds no records; give a JSONL file with one {_shape(fields)} object a line")
    return records


def _record(path: Path, lineno: int, line: str, fields: Sequence[str]) -> dict[str, Any]:
    """One line's object, checked to carry string `fields`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object {_shape(fields)}, got {type(obj).__name__}")
    for field in fields:
        if field not in obj:
            raise DataError(f"{path}:{lineno}: missing field {field!r}; each line needs {_shape(fields)}")
        if not isinstance(obj[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} must be a string, got {type(obj[field]).__name__}")
    return obj


def _shape(fields: Iterable[str]) -> str:
    return "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
