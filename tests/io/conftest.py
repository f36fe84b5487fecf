"""Session-wide tiny checkpoints and adapters (built once, in code) for the io tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`built(kind, key, **kwargs)`: a base ("base") or adapter ("adapter") built once per key."""
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("built")

    def get(kind: str, key: str, **kwargs: Any) -> Path:
        if (kind, key) not in cache:
            out = root / f"{kind}-{key}"
            if kind == "base":
                make_base(out, **kwargs)
            else:
                make_adapter(out=out, **kwargs)
            cache[(kind, key)] = out
        return cache[(kind, key)]

    return get
