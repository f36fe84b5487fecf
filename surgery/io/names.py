"""Tensor-name conventions of checkpoints: where a name says which decoder layer it belongs to.

The io layer (inspect's summary) needs this without a model, and the model layer's
`layout` re-exports it, so there is one rule for both.
"""

from __future__ import annotations

import re

__all__ = ["LAYER_RE", "layer_index"]

# A decoder layer in a tensor or module name: `model.layers.3.`, `transformer.h.0.`, `encoder.layer.2.`,
# `model.decoder.layers.1.`, `blocks.4.`. Group 1 is the layer index.
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor or module name (`model.layers.3.mlp...` -> 3), None outside layers."""
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None
