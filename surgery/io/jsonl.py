"""JSONL data files: one JSON object a line, each checked for the string fields a caller needs.

Calibration, fine-tuning, evaluation and corpus files all go through `read_jsonl`, so every
command reports a bad data file the same way: a `DataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surgery.errors import DataError


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
    records: list[dict[str, Any]] = []
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if limit is not None and len(records) >= limit:
                    break
                if not line.strip():
                    continue
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
                        raise DataError(
                            f"{path}:{lineno}: field {field!r} must be a string, got {type(obj[field]).__name__}"
                        )
                records.append(obj)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}); give a JSONL file") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror})") from None
    if not records:
        raise DataError(f"{path} holds no records; give a JSONL file with one {_shape(fields)} object a line")
    return records


def _shape(fields: Iterable[str]) -> str:
    return "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
