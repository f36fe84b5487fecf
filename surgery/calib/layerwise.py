"""Layer-by-layer calibration from a checkpoint, in about one decoder layer of memory.

The flow of Wanda/SparseGPT and llm-compressor's sequential pipeline, without ever
building the model:
1. A skeleton of the bare model (`model_from_config`) is built with its
   parameters on the meta device (buffers such as rotary frequencies are real); every
   decoder layer is replaced by a recorder. Only the non-layer weights (embeddings,
   final norm) are loaded. Each calibration batch runs through it once: the first
   recorder stores the hidden states entering layer 0 (the activation cache, on the
   CPU), every recorder stores what the model passes to its layer (attention mask,
   position ids, position embeddings (cos, sin), ...), so any architecture whose
   model loop calls `layer(hidden_states, **kwargs)` works (Llama, Qwen2, Mistral,
   Gemma, with per-layer masks for sliding-window layers).
2. For each decoder layer: its weights are read from the checkpoint (`Checkpoint.get`)
   into the layer built from the config, hooks collect `LinearStats` while the cached
   activations run through it, `on_layer` may modify the layer (prune, restore), and
   then the batches run again so the next layer sees the modified outputs
   (Wanda's sequential "masked forward"). The layer is then freed.
With a LoRA adapter, each adapted Linear computes `W x + s·B(A x)` exactly as peft's
unmerged forward does, and its `lora_A`/`lora_B` inputs get statistics of their own.

Peak memory: one decoder layer, the activation cache (samples × tokens × hidden in the
compute dtype) and the per-layer keyword tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.calib.data import Sample
from surgery.calib.stats import Batch, LinearStats, StatsCollector, make_batches
from surgery.errors import MismatchError, SurgeryError
from surgery.io.checkpoint import Checkpoint
from surgery.model.load import load_config, model_from_config
from surgery.progress import track

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from surgery.io.adapter import LoraAdapter

__all__ = ["LayerContext", "LoraLinear", "calibrate_layerwise", "ModelSkeleton"]


# --------------------------------------------------------------------------- building blocks


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device (no memory, no init cost); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Stop(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records what the model passes to it."""

    def __init__(self, index: int, last: bool, sink: dict[str, Any]) -> None:
        super().__init__()
        self.index = index
        self.last = last
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise SurgeryError("this architecture passes positional arguments to its decoder layers; "
                               "layer-by-layer calibration does not support it")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        self.sink["kwargs"].append(kwargs)
        if self.last:
            raise _Stop
        return hidden_states


class LoraLinear(nn.Module):
    """A Linear plus an unmerged LoRA: `base(x) + scaling * lora_B(lora_A(x))`, as peft computes it."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, device=A.device, dtype=A.dtype)
        self.lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


@dataclass
class LayerContext:
    """What `on_layer` gets: the loaded decoder layer, its statistics and LoRA wrappers."""

    index: int
    prefix: str  # checkpoint name prefix of the layer, e.g. "model.layers.3."
    module: nn.Module
    stats: dict[str, LinearStats]
    lora: dict[str, LoraLinear] = field(default_factory=dict)  # module path -> wrapper
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # checkpoint dtype per tensor name

    def linear(self, path: str) -> nn.Linear:
        """The Linear (or a LoRA wrapper's base Linear) at module path `path`."""
        sub = self.module.get_submodule(path[len(self.prefix):])
        return sub.base_layer if isinstance(sub, LoraLinear) else sub  # type: ignore[return-value]


class ModelSkeleton:
    """The bare model of a checkpoint with meta parameters, its layer classes and key prefix."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 attn_implementation: str | None = None) -> None:
        if ckpt.directory is None or not (ckpt.directory / "config.json").is_file():
            raise SurgeryError(f"{ckpt.path} has no config.json; layer-by-layer calibration needs a model directory")
        config = load_config(ckpt.directory)
        config.use_cache = False
        kwargs: dict[str, Any] = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        with _params_on_meta():
            model = model_from_config(config, causal_lm=False, **kwargs)
        self.config = model.config
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(model, "embed_tokens"):
            raise SurgeryError(
                f"{type(model).__name__} has no `layers`/`embed_tokens`; layer-by-layer calibration supports "
                "decoder-only models such as Llama, Qwen2, Mistral and Gemma"
            )
        self.prefix = self._find_prefix(ckpt)
        self.layers: list[nn.Module | None] = list(layers)
        self.spare = SpareTensors()
        self.sink: dict[str, Any] = {"hidden": None, "kwargs": []}
        n = len(layers)
        model.layers = nn.ModuleList([_Recorder(i, i == n - 1, self.sink) for i in range(n)])
        self.model = model

    def load_outer(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        """Read the weights outside the decoder layers (embeddings, final norm).

        A plain embedding lookup is exact in any dtype: its table stays in the checkpoint's
        dtype (for a large vocabulary it outweighs a decoder layer in fp32) and what it
        returns is cast."""
        model = self.model
        keep = {"embed_tokens.weight"} if type(model.embed_tokens) is nn.Embedding else set()
        self._load(model, self.prefix, ckpt, device, dtype, keep=keep)
        if keep:
            model.embed_tokens.register_forward_hook(lambda mod, args, out: out.to(dtype))  # type: ignore[union-attr]
        model.eval()

    @staticmethod
    def _find_prefix(ckpt: Checkpoint) -> str:
        hits = sorted(n for n in ckpt.names() if n.endswith("embed_tokens.weight"))
        if not hits:
            raise SurgeryError(f"{ckpt.path} has no `embed_tokens.weight`; not a supported decoder-only checkpoint")
        return hits[0][: -len("embed_tokens.weight")]

    def _load(self, module: nn.Module, prefix: str, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
              dtypes: dict[str, torch.dtype] | None = None, keep: set[str] | None = None) -> None:
        """Assign the module's parameters and persistent buffers from the checkpoint, cast to `dtype`."""
        state: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for key, value in module.state_dict(keep_vars=True).items():
            name = prefix + key
            if name not in ckpt:
                missing.append(name)
                continue
            info = ckpt.info(name)
            if tuple(info.shape) != tuple(value.shape):
                raise MismatchError(f"{name}: checkpoint shape {list(info.shape)}, config expects {list(value.shape)}")
            stored = info.torch_dtype
            if dtypes is not None:
                dtypes[name] = stored
            cast = stored.is_floating_point and not (keep and key in keep)
            want = dtype if cast else stored
            if device.type == "cpu" and want != stored:  # staged, into a finished layer's memory
                state[key] = ckpt.read_cast(name, want, out=self.spare.take(value.shape, want))
            else:
                state[key] = ckpt.get(name).to(device=device, dtype=want)
        if missing:
            raise MismatchError(f"the checkpoint lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; does config.json match the weights?")
        module.load_state_dict(state, strict=True, assign=True)
        for sub in module.modules():  # non-persistent buffers (rotary frequencies, scales): just move
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device != device:
                    sub._buffers[name] = buf.to(device)
        leftover = [n for n, p in module.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise SurgeryError(f"{leftover[0]} was not loaded from the checkpoint")

    def layer(self, index: int, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.dtype]]:
        """Decoder layer `index` with its weights read from the checkpoint (handed over: freed when dropped)."""
        module = self.layers[index]
        if module is None:
            raise RuntimeError(f"layer {index} was already used")
        self.layers[index] = None
        dtypes: dict[str, torch.dtype] = {}
        self._load(module, f"{self.prefix}layers.{index}.", ckpt, device, dtype, dtypes)
        return module.eval(), dtypes

    @torch.no_grad()
    def embed(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Hidden states entering layer 0 and the keyword arguments of every layer, for one batch."""
        self.sink["hidden"] = None
        self.sink["kwargs"] = []
        kwargs = {"attention_mask": batch.attention_mask.long().to(device)} if batch.padded else {}
        try:
            self.model(input_ids=batch.input_ids.to(device), use_cache=False, **kwargs)
        except _Stop:
            pass
        hidden, per_layer = self.sink["hidden"], self.sink["kwargs"]
        self.sink["hidden"], self.sink["kwargs"] = None, []
        if hidden is None or len(per_layer) != len(self.layers):
            raise SurgeryError("the model did not call its decoder layers as expected; unsupported architecture")
        return hidden, per_layer


class SpareTensors:
    """CPU parameter memory of a finished decoder layer, handed to the next layer's reads.

    Decoder layers share their shapes, so layer i + 1 can be read into layer i's fp32
    weights instead of fresh memory; fresh memory costs a page fault per 4 KiB (on a
    1B-parameter checkpoint, about as long as the reads themselves). A tensor is taken
    back only when nothing else holds its storage (use count checked), so a weight an edit
    kept a reference or view to is never overwritten. Holds at most one layer's tensors."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        """A spare tensor of this shape and dtype (contents undefined), or None."""
        bucket = self._free.get((tuple(shape), dtype))
        return bucket.pop() if bucket else None

    def give(self, module: nn.Module) -> None:
        """Keep the module's exclusively held, contiguous CPU parameters; forget the previous spares."""
        self._free = {}
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None:
            return
        for p in module.parameters():
            t = p.data
            if t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0:
                continue
            # holders: the parameter, `t` and the storage object asked; anything more is someone else's
            if use_count(t.untyped_storage()._cdata) == 3 and t.untyped_storage().nbytes() == t.nbytes:
                self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


def _inject_lora(layer: nn.Module, prefix: str, modules: dict[str, Any], adapter: LoraAdapter,
                 device: torch.device, dtype: torch.dtype) -> dict[str, LoraLinear]:
    """Wrap the layer's adapted Linears with `LoraLinear` (A, B read from the adapter)."""
    out: dict[str, LoraLinear] = {}
    for base_key, m in modules.items():
        if not base_key.startswith(prefix) or not base_key.endswith(".weight"):
            continue
        if m.kind != "linear" or m.is_dora or m.bias_key is not None or m.fan_in_fan_out:
            raise SurgeryError(f"{m.module_path}: only plain LoRA on nn.Linear is supported here "
                               "(no DoRA, lora_bias, Conv1D or embedding LoRA)")
        path = base_key[: -len(".weight")]
        sub = path[len(prefix):]
        parent_name, _, child = sub.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise SurgeryError(f"{path} is a {type(base).__name__}, not a Linear; cannot apply its LoRA")
        wrapper = LoraLinear(base, adapter.lora_A(m).to(device, dtype), adapter.lora_B(m).to(device, dtype), m.scaling)
        setattr(parent, child, wrapper)
        out[path] = wrapper
    return out


# --------------------------------------------------------------------------- runner


def _release_memory() -> None:
    """Give freed heap memory back to the OS after each layer (glibc keeps it otherwise).

    Layer weights, their fp32 copies and per-tensor temporaries are tens of MB each, below
    glibc's largest mmap threshold, so without a trim the heap only grows: measured on a
    1B-parameter checkpoint, resident memory crept by ~20 MB per layer.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Clock:
    """Accumulates wall and CPU seconds per phase into a dict (no-op without one); syncs CUDA."""

    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink = sink

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.sink is None:
            yield
            return
        import time

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.sink[phase] = self.sink.get(phase, 0.0) + time.perf_counter() - start
            self.sink[phase + "_cpu"] = self.sink.get(phase + "_cpu", 0.0) + time.process_time() - cpu


def _forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def calibrate_layerwise(
    checkpoint: Checkpoint | str | Path,
    samples: Sequence[Sample],
    targets: Sequence[str] | None = None,
    *,
    token_mask: str = "all",
    want: Sequence[str] = ("sq_norms",),
    batch_size: int = 1,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    adapter: LoraAdapter | None = None,
    on_layer: Callable[[LayerContext], None] | None = None,
    keep_stats: bool = True,
    attn_implementation: str | None = None,
    description: str = "calibrating",
    timings: dict[str, float] | None = None,
) -> dict[str, LinearStats]:
    """Collect per-Linear statistics one decoder layer at a time, straight from a checkpoint.

    Same keys and values as `collect_linear_stats` on the loaded model (up to float
    rounding). `on_layer(ctx)` runs after each layer's statistics are complete and may
    modify `ctx.module` (weights, LoRA wrappers) in place; the batches are then re-run
    so the next layer is calibrated on the modified layer's outputs (with no `on_layer`
    the calibration pass's outputs are used directly).
    `keep_stats=False` drops each layer's statistics after `on_layer` (bounded memory).
    `timings`, if given, accumulates wall seconds under "setup" (the model's code imported and
    a weightless skeleton built), "read" (checkpoint tensors in),
    "forward" (calibration passes and re-runs) and "on_layer", and process CPU seconds
    under the same names with "_cpu" appended (robust on a shared machine).
    """
    clock = _Clock(timings)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    batches = make_batches(samples, batch_size, token_mask)
    with clock("setup"):  # transformers' model code imported, a weightless model built
        skeleton = ModelSkeleton(ckpt, dev, dtype, attn_implementation)
    with clock("read"):
        skeleton.load_outer(ckpt, dev, dtype)
    lora_modules: dict[str, Any] = {}
    if adapter is not None:
        lora_modules, replacements = adapter.match(ckpt)
        outside = [k for k in [*lora_modules, *replacements] if not k.startswith(f"{skeleton.prefix}layers.")]
        if outside:
            raise SurgeryError(f"the adapter changes {outside[0]}, outside the decoder layers; layer-by-layer "
                               "calibration cannot apply it (merge the adapter and calibrate the merged model)")

    cache: list[torch.Tensor] = []
    layer_kwargs: list[list[dict[str, Any]]] = []
    with clock("forward"):
        for batch in batches:
            hidden, per_layer = skeleton.embed(batch, dev)
            cache.append(hidden.to("cpu", dtype))
            layer_kwargs.append(per_layer)
    skeleton.model = None  # type: ignore[assignment]  # embeddings are no longer needed

    result: dict[str, LinearStats] = {}
    n_layers = len(skeleton.layers)
    log.info("%s %s: %d layers, %d batches of %d samples", description, ckpt.path, n_layers, len(batches),
             len(samples))
    for i in track(range(n_layers), total=n_layers, description=description):
        prefix = f"{skeleton.prefix}layers.{i}."
        with clock("read"):
            layer, dtypes = skeleton.layer(i, ckpt, dev, dtype)
            lora = _inject_lora(layer, prefix, lora_modules, adapter, dev, dtype) if adapter is not None else {}
        collector = StatsCollector(layer, targets, want=want, prefix=prefix)
        try:
            with clock("forward"):
                for b, batch in enumerate(batches):
                    collector.set_token_mask(batch.token_mask)
                    out = _forward(layer, cache[b].to(dev), layer_kwargs[b][i])
                    collector.count_samples(batch.size)
                    if on_layer is None:
                        cache[b] = out.to("cpu", dtype)
                del out
                collector.remove()
            if on_layer is not None:
                with clock("on_layer"):
                    on_layer(LayerContext(i, prefix, layer, collector.stats, lora, dtypes))
                with clock("forward"):
                    for b in range(len(batches)):  # pass 1 kept no outputs: run the (modified) layer again
                        cache[b] = _forward(layer, cache[b].to(dev), layer_kwargs[b][i]).to("cpu", dtype)
        finally:
            collector.remove()
        if keep_stats:
            result.update(collector.stats)
        for b in range(len(batches)):
            layer_kwargs[b][i] = {}
        skeleton.spare.give(layer)  # the next layer is read into this one's memory
        log.debug("layer %d/%d calibrated (%s)", i + 1, n_layers, "with on_layer" if on_layer else "stats only")
        del layer, lora, collector
        _release_memory()
    return result
