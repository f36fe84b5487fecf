"""Reading eval JSONL files: one object a line with a "prompt" (and "answer" for the task)."""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import DataError, InputNotFoundError


def load_jsonl(path: str | Path, fields: tuple[str, ...] = ("prompt",), limit: int | None = None) -> list[dict]:
    """Load a JSONL file and check each row has `fields` as strings; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist or is not a file: give a JSONL file")
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}): write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with {', '.join(fields)}")
            for key in fields:
                if not isinstance(row.get(key), str):
                    raise DataError(f"{path}:{lineno}: missing string field '{key}'")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path} holds no rows: it needs at least one JSON object with {', '.join(fields)}")
    return rows
