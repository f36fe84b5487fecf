"""Reading eval JSONL files: one object a line with a "prompt" (and "answer" for the task).

The reader itself is `surgery.io.jsonl.read_jsonl`, shared with calibration and corpora.
"""

from __future__ import annotations

from surgery.io.jsonl import read_jsonl as load_jsonl

__all__ = ["load_jsonl"]
