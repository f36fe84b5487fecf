"""Reused staging memory for block-at-a-time reads, casts and writes.

Streaming a tensor through a small buffer that is kept from block to block and tensor to
tensor avoids allocating (and page-faulting in) fresh memory per tensor, which on a VM costs
about as much as the file I/O itself. One `Staging` per thread: buffers are not shared.
"""

from __future__ import annotations

import torch


class Staging:
    """Buffers by (role, dtype), grown on demand, at least `elements` long."""

    def __init__(self, elements: int = 1 << 20) -> None:
        self.elements = elements
        self._store: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A 1-D tensor of `numel` elements of `dtype`, reusing this role's buffer."""
        buf = self._store.get((role, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._store[(role, dtype)] = torch.empty(max(numel, self.elements), dtype=dtype)
        return buf[:numel]


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, as a flat unsigned-byte memoryview (no copy)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a Buffer


def flat_bytes(data: memoryview) -> memoryview:
    """`data` as a flat unsigned-byte view, as pread/pwrite take it."""
    return data if data.format == "B" and data.ndim == 1 else data.cast("B")
