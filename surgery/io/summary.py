"""What a checkpoint or adapter holds, from headers alone (for `surgery inspect`).

`summarize(path)` recognises a peft adapter directory (it has `adapter_config.json`)
or a checkpoint (directory, shards with index, or a single `.safetensors` file) and
returns a JSON-ready dict: tensor count, parameters, bytes per dtype, layers,
module types and, for adapters, rank/alpha/targets. No tensor data is read.
Also the byte-size helpers the CLI uses ("5GB", "500MB", "1.5GiB").
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.io.adapter import CONFIG_NAME, LoraAdapter
from surgery.io.checkpoint import Checkpoint
from surgery.io.header import TensorInfo
from surgery.io.names import LAYER_RE, layer_index

log = logging.getLogger(__name__)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes of a human size: 5GB (10^9), 500MB, 1.5GiB (2^30), 1000 (bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise SurgeryError(f"cannot read size {text!r}; write it like 5GB, 500MB or 1.5GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SurgeryError(f"size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """A byte count for people: 1.23 GB, 456.0 MB, 12 B."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{int(n)} B"


def module_type(name: str) -> str:
    """A tensor name with the layer index and leading wrappers removed, grouping
    the same tensor across layers: `model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`."""
    match = LAYER_RE.search(name)
    return name[match.end():] if match else name


def _dtype_stats(infos: list[TensorInfo]) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for info in infos:
        entry = stats[info.dtype]
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        entry["bytes"] += info.nbytes
    return dict(sorted(stats.items()))


def summarize_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """Summary of a checkpoint's tensors."""
    infos = ckpt.infos()
    layers = sorted({i for i in (layer_index(n.name) for n in infos) if i is not None})
    types: dict[str, dict[str, Any]] = {}
    for info in infos:
        key = module_type(info.name)
        entry = types.setdefault(key, {"count": 0, "parameters": 0, "shape": list(info.shape), "dtype": info.dtype})
        entry["count"] += 1
        entry["parameters"] += info.numel
    config = ckpt.config() or {}
    largest = max(infos, key=lambda i: i.nbytes, default=None)
    return {
        "kind": "checkpoint",
        "path": str(ckpt.path),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "files": [p.name for p in ckpt.files],
        "sharded": ckpt.index_path is not None,
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "dtypes": _dtype_stats(infos),
        "layers": len(layers),
        "module_types": types,
        "largest_tensor": None if largest is None else {"name": largest.name, "bytes": largest.nbytes},
        "metadata": ckpt.metadata(),
    }


def summarize_adapter(adapter: LoraAdapter) -> dict[str, Any]:
    """Summary of a LoRA adapter: ranks, alphas, targets, DoRA, saved full tensors."""
    infos = [adapter.info(k) for k in adapter.names()]
    modules = list(adapter.modules.values())
    cfg = adapter.config
    layers = sorted({i for i in (layer_index(m.module_path) for m in modules) if i is not None})
    per_target: dict[str, dict[str, Any]] = {}
    for m in modules:
        short = m.module_path.rsplit(".", 1)[-1]
        entry = per_target.setdefault(short, {"modules": 0, "ranks": Counter(), "alphas": Counter(), "kind": m.kind})
        entry["modules"] += 1
        entry["ranks"][m.r] += 1
        entry["alphas"][m.alpha] += 1
    targets = {
        k: {
            "modules": v["modules"],
            "kind": v["kind"],
            "r": sorted(v["ranks"]),
            "alpha": sorted(v["alphas"]),
        }
        for k, v in sorted(per_target.items())
    }
    return {
        "kind": "adapter",
        "path": str(adapter.directory),
        "base_model": cfg.get("base_model_name_or_path"),
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "dtypes": _dtype_stats(infos),
        "modules": len(modules),
        "layers": len(layers),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "ranks": dict(sorted(Counter(m.r for m in modules).items())),
        "scalings": sorted({round(m.scaling, 6) for m in modules}),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "use_dora": any(m.is_dora for m in modules),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out", False)),
        "lora_bias": any(m.bias_key is not None for m in modules),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "targets": targets,
        "full_tensors": sorted(adapter.replacements),
    }


def summarize(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Summary of an adapter directory or a checkpoint, whichever `path` is."""
    path = Path(path)
    if (path.is_dir() and (path / CONFIG_NAME).is_file()) or path.name == CONFIG_NAME:
        log.debug("%s: a LoRA adapter (%s found); reading its headers", path, CONFIG_NAME)
        return summarize_adapter(LoraAdapter.open(path, allow_pickle=allow_pickle))
    log.debug("%s: no %s, reading it as a checkpoint", path, CONFIG_NAME)
    return summarize_checkpoint(Checkpoint.open(path, allow_pickle=allow_pickle))
