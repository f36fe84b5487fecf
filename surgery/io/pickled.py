"""Loading pickle (`.bin`) weights safely: `torch.load(weights_only=True)`, errors in our words.

A pickle can name any Python callable; `weights_only=True` refuses every global outside
torch's allow-list. Torch's own refusal text suggests retrying with `weights_only=False`,
which would run the code, so the refusal is re-worded here to name the blocked global and
stop. Zip-format files (`torch.save` since 1.6) are memory-mapped; legacy non-zip files
cannot be and are read whole.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from surgery.errors import CorruptFileError

_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")


def blocked_global(message: str) -> str | None:
    """The global a weights-only unpickler refused, from torch's error text (None if unnamed)."""
    found = _GLOBAL.search(message)
    return found.group(1).rstrip(".") if found else None


def _reason(exc: BaseException) -> str:
    """The first line of an error that does not tell the user to turn weights_only off."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "weights_only" not in ln and "documentation" not in ln]
    return (useful or [type(exc).__name__])[0]


def load_pickle_weights(path: Path) -> object:
    """`torch.load(path, weights_only=True)` on the CPU (memory-mapped when the file is a zip).

    Raises `CorruptFileError` naming the blocked global for a pickle that tries to call
    code, and one line for any other file torch cannot read this way.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        name = blocked_global(str(exc))
        what = f"blocked global {name}" if name else f"a construct weights_only=True refuses ({_reason(exc)})"
        raise CorruptFileError(
            f"{path}: {what} in the pickle; refusing (surgery loads pickles with weights_only=True only)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CorruptFileError(
            f"{path} cannot be loaded as weights ({_reason(exc)}); re-download it or convert it to safetensors"
        ) from None
