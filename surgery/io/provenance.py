"""Provenance metadata written into every safetensors output.

`__metadata__` must map strings to strings: `format=pt` (what transformers expects),
the tool version, the method, its parameters as JSON, and a sha256 of each input
(a checkpoint's index and headers, or a data file's bytes), so that any output can
be traced to what produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import surgery


def fingerprint(obj: Any) -> str:
    """sha256 identifying an input: its `fingerprint()`, or a file's bytes/header, or a dir's checkpoint."""
    if hasattr(obj, "fingerprint"):
        return obj.fingerprint()
    path = Path(obj)
    if path.is_file():
        if path.suffix == ".safetensors":
            from surgery.io.header import read_header

            return read_header(path).sha256()
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            digest = hashlib.sha256((path / "adapter_config.json").read_bytes())
            weights = path / "adapter_model.safetensors"
            if weights.is_file():
                from surgery.io.header import read_header

                digest.update(read_header(weights).raw)
            return digest.hexdigest()
        from surgery.io.checkpoint import Checkpoint

        return Checkpoint.open(path).fingerprint()
    return hashlib.sha256(str(obj).encode()).hexdigest()


def provenance(
    method: str, params: Mapping[str, Any] | None = None, inputs: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The `__metadata__` dict for an output of `method` run with `params` on `inputs`."""
    metadata = {
        "format": "pt",
        "surgery.version": surgery.__version__,
        "surgery.method": method,
        "surgery.params": json.dumps(dict(params or {}), sort_keys=True, default=str),
    }
    if inputs:
        metadata["surgery.inputs"] = json.dumps(
            {label: fingerprint(obj) for label, obj in inputs.items()}, sort_keys=True
        )
    return metadata
