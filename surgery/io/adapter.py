"""peft LoRA adapters read at the tensor level, without building any model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
(legacy `adapter_model.bin` only with `allow_pickle`). Keys look like
`base_model.model.<module path>.lora_A.weight`; the module's base tensor is
`<module path>.weight`. `LoraAdapter.delta(m)` gives a module's update in fp32 in
the base weight's own layout, with peft's scaling rules (alpha/r, alpha/sqrt(r) for
rslora, `rank_pattern`/`alpha_pattern` regexes), fan_in_fan_out (GPT-2 Conv1D) and
embedding LoRA (transposed delta). DoRA magnitudes, `lora_bias` and full
replacement tensors (`modules_to_save`, saved embedding layers) are exposed so a
merge can apply them; `match(base)` binds modules to a concrete base checkpoint.
`adapter_config.json` is checked against one schema (`adapter_schema.SCHEMA`) first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery.errors import (
    CorruptFileError,
    InputNotFoundError,
    MismatchError,
    PickleRefusedError,
    SurgeryError,
)
from surgery.io.adapter_schema import validate_adapter_config
from surgery.io.header import TensorInfo, dtype_name, read_header
from surgery.io.paths import refuse_special_file, require_regular_file
from surgery.io.pickled import load_pickle_weights

if TYPE_CHECKING:
    from surgery.io.atomic import InputPaths
    from surgery.io.checkpoint import Checkpoint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# suffix on disk -> (role, kind)
_LORA_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_A.weight", "a", "linear"),
    (".lora_B.weight", "b", "linear"),
    (".lora_B.bias", "bias", "linear"),
    (".lora_embedding_A", "a", "embedding"),
    (".lora_embedding_B", "b", "embedding"),
    (".lora_magnitude_vector.weight", "magnitude", ""),
    (".lora_magnitude_vector", "magnitude", ""),
)
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "embeddings")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: where its tensors are and how its delta is scaled."""

    module_path: str
    base_key: str
    a_key: str
    b_key: str
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    kind: str  # "linear" | "embedding"
    magnitude_key: str | None = None
    bias_key: str | None = None
    tied_head: bool = False  # an output head the base stores tied to its input embedding (base_key)

    @property
    def is_dora(self) -> bool:
        return self.magnitude_key is not None

    @property
    def base_bias_key(self) -> str:
        """The base tensor a `lora_B.bias` merges into."""
        return self.base_key[: -len("weight")] + "bias"


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern matching `name` with peft's rule `(.*\\.)?(pattern)$`, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module path, role, kind) of a LoRA tensor key, or None for other keys."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for suffix, role, kind in _LORA_SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role, kind
    return None


def base_key_candidates(key: str, base_names: Iterable[str]) -> list[str]:
    """Names `key` may carry in a base checkpoint: itself, without or with a leading
    `model.`/`transformer.`-style component (a causal-LM wrapper versus its bare model)."""
    out = [key]
    if "." in key:
        out.append(key.split(".", 1)[1])
    prefixes = sorted({n.split(".", 1)[0] for n in base_names if "." in n})
    out.extend(f"{p}.{key}" for p in prefixes)
    return out


class LoraAdapter:
    """A peft LoRA adapter read lazily from disk (safetensors) or from a pickle on request."""

    def __init__(
        self,
        directory: Path,
        config: dict[str, Any],
        infos: dict[str, TensorInfo],
        fingerprint: str,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self._infos = infos
        self._fingerprint = fingerprint
        self._tensors = tensors  # only for pickle adapters (small, already in memory)
        self._handle: Any = None
        self.modules: dict[str, LoraModule] = {}
        self.replacements: dict[str, str] = {}  # base key (as the adapter names it) -> adapter key
        self._parse()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False) -> LoraAdapter:
        """Open an adapter directory (or its adapter_config.json)."""
        path = Path(path)
        if path.is_file() and path.name == CONFIG_NAME:
            path = path.parent
        if not path.exists():
            raise InputNotFoundError(f"adapter {path} does not exist; check the path")
        if not path.is_dir():
            raise InputNotFoundError(
                f"{path} is not an adapter directory; pass the folder holding {CONFIG_NAME}"
            )
        config_path = path / CONFIG_NAME
        require_regular_file(config_path)
        refuse_special_file(path / WEIGHTS_NAME)
        refuse_special_file(path / PICKLE_NAME)
        if not config_path.is_file():
            raise InputNotFoundError(
                f"{path} has no {CONFIG_NAME}; is it a peft LoRA adapter directory?"
            )
        try:
            raw_config = config_path.read_bytes()
        except OSError as exc:
            raise InputNotFoundError(f"{config_path} cannot be read ({exc.strerror}); fix its permissions") from None
        try:
            config = json.loads(raw_config.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{config_path} is not valid JSON ({exc}); re-export the adapter") from None
        if not isinstance(config, dict):
            raise CorruptFileError(f"{config_path} is not a JSON object; re-export the adapter")
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise SurgeryError(f"{path} is a {peft_type} adapter; only LoRA adapters are supported")

        digest = hashlib.sha256(raw_config)
        weights = path / WEIGHTS_NAME
        if weights.is_file():
            header = read_header(weights)
            digest.update(header.raw)
            return cls(path, config, dict(header.tensors), digest.hexdigest())
        pickle_path = path / PICKLE_NAME
        if pickle_path.is_file():
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{pickle_path} is a pickle file, which can run code when loaded; "
                    "convert it to safetensors or pass --allow-pickle if you trust it"
                )
            loaded = load_pickle_weights(pickle_path)
            if not isinstance(loaded, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
            ):
                raise CorruptFileError(f"{pickle_path} is not a name -> tensor mapping")
            tensors = {k: v.contiguous() for k, v in loaded.items()}
            infos = {
                k: TensorInfo(k, dtype_name(v.dtype), tuple(v.shape), (0, v.numel() * v.element_size()), pickle_path)
                for k, v in tensors.items()
            }
            digest.update(pickle_path.read_bytes())
            return cls(path, config, infos, digest.hexdigest(), tensors=tensors)
        raise InputNotFoundError(f"{path} has no {WEIGHTS_NAME}; is the adapter complete?")

    # ------------------------------------------------------------------ parsing
    def _parse(self) -> None:
        cfg = validate_adapter_config(self.config, self.directory / CONFIG_NAME)
        default_r: int = cfg["r"]
        default_alpha: float = cfg["lora_alpha"]
        rank_pattern: dict[str, int] = cfg["rank_pattern"]
        alpha_pattern: dict[str, float] = cfg["alpha_pattern"]
        rslora: bool = cfg["use_rslora"]
        fan_in_fan_out: bool = cfg["fan_in_fan_out"]

        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self._infos:
            split = _split_key(key)
            if split is None:
                if not key.startswith(PREFIX):
                    raise CorruptFileError(
                        f"adapter tensor {key!r} does not start with {PREFIX!r}; is this a peft adapter?"
                    )
                rest = key[len(PREFIX):]
                if "lora_" in rest or "trainable_tokens" in rest:
                    raise SurgeryError(f"adapter tensor {key!r} is of a kind this tool does not support")
                self.replacements[rest.replace(".base_layer.", ".")] = key
                continue
            path, role, kind = split
            if role in parts.setdefault(path, {}):
                raise CorruptFileError(f"adapter has two {role} tensors for module {path}")
            parts[path][role] = key
            if kind:
                if kinds.setdefault(path, kind) != kind:
                    raise CorruptFileError(f"module {path} mixes linear and embedding LoRA tensors")

        for path, roles in sorted(parts.items()):
            if "a" not in roles or "b" not in roles:
                missing = "A" if "a" not in roles else "B"
                raise CorruptFileError(f"adapter module {path} has no lora_{missing} tensor; re-export the adapter")
            kind = kinds[path]
            a_shape = self._infos[roles["a"]].shape
            b_shape = self._infos[roles["b"]].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CorruptFileError(
                    f"adapter module {path}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not form "
                    "a rank-r product; re-export the adapter"
                )
            r_found = a_shape[0]
            rk = pattern_key(rank_pattern, path)
            ak = pattern_key(alpha_pattern, path)
            r = rank_pattern[rk] if rk is not None else default_r
            alpha = alpha_pattern[ak] if ak is not None else default_alpha
            if r != r_found:
                raise CorruptFileError(
                    f"adapter module {path} has rank {r_found} but adapter_config.json implies r={r} "
                    "(check r and rank_pattern)"
                )
            if r <= 0:
                raise CorruptFileError(f"adapter module {path} has rank {r}")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            self.modules[path] = LoraModule(
                module_path=path,
                base_key=f"{path}.weight",
                a_key=roles["a"],
                b_key=roles["b"],
                r=r,
                alpha=alpha,
                scaling=scaling,
                fan_in_fan_out=fan_in_fan_out and kind == "linear",
                kind=kind,
                magnitude_key=roles.get("magnitude"),
                bias_key=roles.get("bias"),
            )

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """All tensor keys in the adapter file."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Header information of one adapter tensor."""
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"adapter has no tensor {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        """One adapter tensor in its stored dtype."""
        if key not in self._infos:
            raise KeyError(f"adapter has no tensor {key!r}")
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.directory / WEIGHTS_NAME), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - a header the validator accepted but safetensors refuses
                raise CorruptFileError(f"{self.directory / WEIGHTS_NAME} cannot be opened: {exc}") from None
        return self._handle.get_tensor(key)

    def fingerprint(self) -> str:
        """sha256 of the config and the weights header (or the pickle's bytes)."""
        return self._fingerprint

    def lora_A(self, m: LoraModule) -> torch.Tensor:
        """lora_A as fp32, shape [r, in] (embedding: [r, num_embeddings])."""
        return self.get(m.a_key).to(torch.float32)

    def lora_B(self, m: LoraModule) -> torch.Tensor:
        """lora_B as fp32, shape [out, r] (embedding: [dim, r])."""
        return self.get(m.b_key).to(torch.float32)

    def magnitude(self, m: LoraModule) -> torch.Tensor | None:
        """The DoRA magnitude vector as fp32, or None."""
        return None if m.magnitude_key is None else self.get(m.magnitude_key).to(torch.float32).reshape(-1)

    def bias(self, m: LoraModule) -> torch.Tensor | None:
        """`lora_B.bias` times the scaling as fp32 (what merges into the base bias), or None."""
        return None if m.bias_key is None else self.get(m.bias_key).to(torch.float32) * m.scaling

    def delta_shape(self, m: LoraModule) -> tuple[int, int]:
        """Shape of `delta(m)`, i.e. of the base weight, from headers only."""
        a = self._infos[m.a_key].shape
        b = self._infos[m.b_key].shape
        out, inp = b[0], a[1]
        if m.kind == "embedding" or m.fan_in_fan_out:
            return (inp, out)
        return (out, inp)

    def delta(self, m: LoraModule) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout (transposed for
        fan_in_fan_out and for embeddings, whose weight is [num_embeddings, dim])."""
        d = self.lora_B(m) @ self.lora_A(m)
        if m.kind == "embedding" or m.fan_in_fan_out:
            d = d.T
        return (d * m.scaling).contiguous()

    # ------------------------------------------------------------------ binding
    def targets(self) -> list[str]:
        """Short module names targeted (e.g. q_proj, v_proj), sorted."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.modules})

    def match(self, base: Checkpoint) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """Bind the adapter to a base checkpoint.

        Returns `(modules, replacements)`: modules keyed by the base checkpoint's own
        tensor name (with `base_key` rewritten to it, and fan_in_fan_out corrected from
        the base shape as peft does for Conv1D/Linear), and replacement tensors as
        base name -> adapter key. Raises `MismatchError` listing the first offenders
        when a key is missing in the base or a shape does not fit.
        """
        names = list(base.names())
        name_set = set(names)
        problems: list[str] = []
        bound: dict[str, LoraModule] = {}
        owner: dict[str, str] = {}

        prefixes = sorted({n.split(".", 1)[0] for n in names if "." in n})
        prefixed = [f"{p}.x" for p in prefixes]  # what base_key_candidates needs of the names

        def resolve(key: str) -> str | None:
            if key in name_set:
                return key
            hits = [c for c in base_key_candidates(key, prefixed) if c in name_set]
            if hits:
                return hits[0]
            tied = self._tied_target(key, base, name_set)
            return tied

        for path, m in self.modules.items():
            target = resolve(m.base_key)
            if target is None:
                problems.append(f"{m.base_key} (module {path}) is not in the base")
                continue
            if target in owner:
                problems.append(f"modules {owner[target]} and {path} both change {target}")
                continue
            shape = tuple(base.info(target).shape)
            a = self._infos[m.a_key].shape
            b = self._infos[m.b_key].shape
            fif = m.fan_in_fan_out
            if m.kind == "linear":
                straight, transposed = (b[0], a[1]), (a[1], b[0])
                if shape == transposed and shape != straight:
                    fif = True
                elif shape == straight and shape != transposed:
                    fif = False
                expected = transposed if fif else straight
            else:
                expected = (a[1], b[0])
            if shape != expected:
                problems.append(
                    f"{target}: base shape {list(shape)} but the adapter's delta is {list(expected)} "
                    f"(lora_A {list(a)}, lora_B {list(b)})"
                )
                continue
            if m.magnitude_key is not None:
                mag = math.prod(self._infos[m.magnitude_key].shape)
                rows = expected[1] if (fif or m.kind == "embedding") else expected[0]
                if mag != rows:
                    problems.append(f"{target}: DoRA magnitude has {mag} entries, expected {rows}")
                    continue
            tied_head = target != m.base_key and target not in base_key_candidates(m.base_key, prefixed)
            new = dataclasses.replace(m, base_key=target, fan_in_fan_out=fif, tied_head=tied_head)
            if new.bias_key is not None:
                bias_target = new.base_bias_key
                if bias_target not in name_set:
                    problems.append(f"{target}: lora_bias needs a base bias {bias_target}, which is missing")
                    continue
                if tuple(base.info(bias_target).shape) != tuple(self._infos[new.bias_key].shape):
                    problems.append(f"{bias_target}: base bias shape differs from lora_B.bias")
                    continue
            owner[target] = path
            bound[target] = new

        replacements: dict[str, str] = {}
        for key, akey in self.replacements.items():
            target = resolve(key)
            if target is None:
                problems.append(f"{key} (saved full tensor {akey}) is not in the base")
                continue
            if tuple(base.info(target).shape) != tuple(self._infos[akey].shape):
                problems.append(
                    f"{target}: base shape {list(base.info(target).shape)} but the adapter saves "
                    f"{list(self._infos[akey].shape)}"
                )
                continue
            replacements[target] = akey

        if problems:
            shown = "; ".join(problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise MismatchError(
                f"adapter {self.directory} does not fit the base: {shown}{more}; "
                "use the base model the adapter was trained on"
            )
        return bound, replacements

    @staticmethod
    def tied_embedding(base: Checkpoint) -> str | None:
        """The input-embedding tensor that `base` also uses as its output head (no
        `lm_head.weight` stored, `tie_word_embeddings` not false), or None."""
        return LoraAdapter._tied_target("lm_head.weight", base, set(base.names()))

    @staticmethod
    def _tied_target(key: str, base: Checkpoint, name_set: set[str]) -> str | None:
        """An output head that the base stores tied to its input embedding."""
        if not key.endswith("lm_head.weight") or key in name_set:
            return None
        config = base.config() or {}
        if not config.get("tie_word_embeddings", True):
            return None
        for name in sorted(name_set):
            parts = name.split(".")
            if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _EMBEDDING_NAMES:
                return name
        return None


def write_adapter(
    out: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a peft-loadable adapter directory atomically (config + one safetensors file).

    `tensors` are keyed as peft saves them (`base_model.model.<path>.lora_A.weight`).
    """
    from surgery.io.writer import CheckpointWriter, TensorSpec

    cfg = dict(config)
    cfg.setdefault("peft_type", "LORA")
    if "target_modules" not in cfg:
        cfg["target_modules"] = sorted(
            {s[0].rsplit(".", 1)[-1] for k in tensors if (s := _split_key(k)) is not None}
        )
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    out = Path(out)
    with CheckpointWriter(
        out,
        specs,
        shard_size=1 << 62,
        metadata=dict(metadata or {}),
        force=force,
        weights_name=WEIGHTS_NAME,
        extra_files={CONFIG_NAME: json.dumps(cfg, indent=2, sort_keys=True) + "\n"},
    ) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    return out


def rewrite_adapter(
    adapter: LoraAdapter,
    out: str | Path,
    replaced: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    extra_files: Mapping[str, str] | None = None,
    inputs: InputPaths = (),
) -> Path:
    """Write `adapter` to `out` with the tensors in `replaced` swapped in, atomically.

    The config is kept; tensors not replaced are streamed from the input one at a time,
    so a repair that changes a few lora_B (SafeLoRA, SaLoRA, Antidote) never holds the
    whole adapter. `extra_files` (e.g. a report) land in the same atomic directory.
    An `out` that overlaps the adapter or one of the command's other `inputs` is refused.
    """
    from surgery.io.writer import CheckpointWriter, TensorSpec

    names = adapter.names()
    specs = [TensorSpec.like(n, replaced[n] if n in replaced else adapter.info(n)) for n in names]
    extra = {CONFIG_NAME: json.dumps(adapter.config, indent=2, sort_keys=True) + "\n", **dict(extra_files or {})}
    with CheckpointWriter(out, specs, shard_size=1 << 62, metadata=dict(metadata or {}), force=force,
                          weights_name=WEIGHTS_NAME, extra_files=extra,
                          inputs=inputs or {"ADAPTER": adapter.directory}) as writer:
        for n in names:
            writer.write(n, replaced[n] if n in replaced else adapter.get(n))
    return Path(out)
