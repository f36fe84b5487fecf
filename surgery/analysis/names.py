"""Where a tensor sits in the model, parsed from its name alone (any architecture).

`model.layers.3.self_attn.q_proj.weight` -> stack `model.layers`, layer 3, module type
`self_attn.q_proj`; `transformer.h.0.mlp.c_proj.bias` -> `transformer.h`, 0, `mlp.c_proj`.
The layer is the one `surgery.model.layout.LAYER_RE` finds; further indices (MoE experts)
become `*` so that experts aggregate into one type. Names outside the layers (embeddings,
the final norm, the head) have no layer and keep their path as their type.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.model.layout import LAYER_RE

PARAM_SUFFIXES = ("weight", "bias")


@dataclass(frozen=True)
class TensorPlace:
    """Parsed position: `stack` (the container of the layers), `layer` index, module `type`."""

    stack: str | None
    layer: int | None
    type: str


def parse_name(name: str) -> TensorPlace:
    """Split a tensor name into (stack, layer, module type); see the module docstring."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in PARAM_SUFFIXES:
        parts = parts[:-1]
    path = ".".join(parts)
    match = LAYER_RE.search(path + ".")
    rest = path[match.end():] if match else ""
    if match is None or not rest:
        return TensorPlace(None, None, path)
    stack = path[:match.start(1) - 1]
    return TensorPlace(stack, int(match.group(1)), ".".join("*" if p.isdigit() else p for p in rest.split(".")))
