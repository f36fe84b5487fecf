"""Activation statistics of Linear layers, collected with forward hooks.

For each selected `nn.Linear` (by name pattern) the hooks accumulate, in fp32 and over
the counted tokens only (all tokens, or response tokens):
- `sq_norms[j] = sum_t x_tj^2`, the per-input-channel squared norm Wanda scores use;
- `tokens`, the number of counted tokens;
- optionally `xtx = Xᵀ X` (uncentred input covariance) and `yty = Yᵀ Y` with `Y = X Wᵀ`
  (the bias-free output; SaLoRA's feature covariance).
Sums, not means: they add up exactly over batches and over the layer-by-layer runner;
Wanda's running mean over sequences is a constant rescaling and ranks the same.

peft LoRA layers (anything with `base_layer`, `lora_A`, `lora_B`) yield three entries:
`P` (the base layer's input x), `P.lora_A` (x, as lora_A sees it) and `P.lora_B`
(A·x, the r-dim input of lora_B), where `P` is the module path without peft's
`base_model.model.` prefix, as in checkpoint and adapter keys.

`collect_linear_stats` runs a whole model already in memory; `surgery.calib.layerwise`
collects the same statistics one decoder layer at a time from a checkpoint.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.calib.data import Sample
from surgery.errors import DataError, SurgeryError
from surgery.kernels.activation_stats import channel_sq_norms, covariance
from surgery.model.layout import LAYER_RE, strip_peft_prefix

__all__ = [
    "LinearStats",
    "StatsCollector",
    "collect_linear_stats",
    "make_batches",
    "match_target",
    "normalize_name",
    "DEFAULT_TARGET_RE",
]

WANTS = ("sq_norms", "xtx", "yty")
TOKEN_MASKS = ("all", "response")
# Default selection: every Linear inside a decoder layer (`...layers.<i>....`), as Wanda does.
DEFAULT_TARGET_RE = LAYER_RE


@dataclass
class LinearStats:
    """Statistics of one Linear's input (and optionally output) over the counted tokens."""

    name: str
    in_features: int
    tokens: int = 0
    sq_norms: torch.Tensor | None = None  # fp32 [d_in], sum over tokens of x^2
    xtx: torch.Tensor | None = None  # fp32 [d_in, d_in]
    yty: torch.Tensor | None = None  # fp32 [d_out, d_out], Y = X W^T
    samples: int = 0  # sequences seen (Wanda normalises by this; irrelevant for ranking)
    extra: dict[str, object] = field(default_factory=dict)

    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input channel (fp32)."""
        if self.sq_norms is None:
            raise ValueError(f"{self.name}: squared norms were not collected")
        return self.sq_norms.sqrt()

    def to(self, device: torch.device | str) -> LinearStats:
        """A copy with its tensors on `device`."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LinearStats(self.name, self.in_features, self.tokens, move(self.sq_norms), move(self.xtx),
                           move(self.yty), self.samples, dict(self.extra))


def normalize_name(name: str) -> str:
    """Module path as checkpoints and adapters name it (peft's `base_model.model.` removed)."""
    return strip_peft_prefix(name)


def match_target(name: str, targets: Sequence[str] | None) -> bool:
    """Whether module path `name` is selected.

    `targets=None` selects every Linear inside a decoder layer. Otherwise a target
    matches a path equal to it, ending in `.<target>` (`q_proj`, `self_attn.q_proj`),
    or matching it as a glob (`*.mlp.*`) or, prefixed with `re:`, as a full regex.
    """
    if targets is None:
        return bool(DEFAULT_TARGET_RE.search(name))
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif any(c in t for c in "*?["):
            if fnmatch.fnmatchcase(name, t):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def _lora_parts(module: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear] | None:
    """(base_layer, lora_A, lora_B) of a peft LoRA layer's active adapter, or None."""
    base = module.base_layer
    a, b = module.lora_A, module.lora_B
    if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict):
        active = getattr(module, "active_adapters", None) or list(a.keys())
        key = active[0] if isinstance(active, (list, tuple)) else active
        if key not in a:
            return None
        a, b = a[key], b[key]
    if not isinstance(base, nn.Module) or not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
        return None
    return base, a, b


class StatsCollector:
    """Forward hooks that accumulate `LinearStats` on selected Linears of a module tree.

    Call `set_token_mask(mask)` (bool, the leading dims of the activations) before each
    forward when only some tokens count; `None` counts all. `remove()` detaches the hooks.
    """

    def __init__(
        self,
        root: nn.Module,
        targets: Sequence[str] | None = None,
        *,
        want: Sequence[str] = ("sq_norms",),
        prefix: str = "",
        lora: bool = True,
    ) -> None:
        bad = [w for w in want if w not in WANTS]
        if bad:
            raise ValueError(f"unknown statistics {bad}; choose from {WANTS}")
        self.want = tuple(want)
        self.stats: dict[str, LinearStats] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.enabled = True
        inside_lora: set[int] = set()
        for raw, module in root.named_modules():
            name = normalize_name(prefix + raw) if raw else normalize_name(prefix.rstrip("."))
            if id(module) in inside_lora:
                continue
            if _is_lora_layer(module):
                parts = _lora_parts(module)
                for sub in module.modules():
                    if sub is not module:
                        inside_lora.add(id(sub))
                if parts is None or not match_target(name, targets):
                    continue
                base, a, b = parts
                if isinstance(base, nn.Linear):
                    self._hook(name, base)
                if lora:
                    self._hook(name + ".lora_A", a, output=False)
                    self._hook(name + ".lora_B", b, output=False)
                continue
            if isinstance(module, nn.Linear) and match_target(name, targets):
                self._hook(name, module)

    def _hook(self, name: str, module: nn.Linear, output: bool = True) -> None:
        if name in self.stats:
            raise ValueError(f"two modules are named {name}")
        st = LinearStats(name, module.in_features)
        self.stats[name] = st
        want_y = "yty" in self.want and output

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.enabled:
                return
            x = args[0] if args else kwargs["input"] if "input" in kwargs else kwargs["x"]
            self._accumulate(st, mod, x, want_y)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _accumulate(self, st: LinearStats, mod: nn.Module, x: torch.Tensor, want_y: bool) -> None:
        d = x.shape[-1]
        x2 = x.detach().reshape(-1, d)
        mask = None
        if self._mask is not None:
            mask = self._mask.to(x2.device).reshape(-1)
            if mask.numel() != x2.shape[0]:
                raise SurgeryError(
                    f"{st.name}: sees {x2.shape[0]} tokens but the token mask has {mask.numel()}; "
                    "this module does not run once per token (use --tokens all)"
                )
        n = int(mask.sum()) if mask is not None else x2.shape[0]
        st.tokens += n
        if "sq_norms" in self.want:
            s = channel_sq_norms(x2, mask)
            st.sq_norms = s if st.sq_norms is None else st.sq_norms.add_(s)
        if "xtx" in self.want:
            c = covariance(x2, mask)
            st.xtx = c if st.xtx is None else st.xtx.add_(c)
        if want_y:
            xs = x2 if mask is None else x2[mask]
            y = xs.float() @ mod.weight.detach().float().t()  # type: ignore[operator]  # a Linear's weight
            c = covariance(y, None)
            st.yty = c if st.yty is None else st.yty.add_(c)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Bool mask over the (batch, time) positions of the next forward; None counts all."""
        self._mask = mask

    def count_samples(self, n: int) -> None:
        """Record that `n` more sequences went through."""
        for st in self.stats.values():
            st.samples += n

    def remove(self) -> None:
        """Detach every hook (statistics stay in `self.stats`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards without accumulating (e.g. the re-run after pruning)."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old


@dataclass
class Batch:
    """Right-padded ids [B, T], attention mask [B, T] and counted-token mask [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_mask: torch.Tensor
    size: int

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())


def make_batches(samples: Sequence[Sample], batch_size: int, token_mask: str = "all",
                 pad_id: int = 0) -> list[Batch]:
    """Group samples into right-padded batches; pads never count, prompts count only for "all"."""
    if token_mask not in TOKEN_MASKS:
        raise ValueError(f"token_mask must be one of {TOKEN_MASKS}, got {token_mask!r}")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if not samples:
        raise DataError("no calibration samples; give a non-empty calibration file")
    if token_mask == "response" and not any(s.num_response_tokens for s in samples):
        raise DataError("no calibration sample has response tokens; use --tokens all or give responses")
    out: list[Batch] = []
    for i in range(0, len(samples), batch_size):
        group = samples[i:i + batch_size]
        t = max(len(s) for s in group)
        ids = torch.full((len(group), t), pad_id, dtype=torch.long)
        att = torch.zeros((len(group), t), dtype=torch.bool)
        tok = torch.zeros((len(group), t), dtype=torch.bool)
        for j, s in enumerate(group):
            n = len(s)
            ids[j, :n] = s.input_ids
            att[j, :n] = True
            tok[j, :n] = s.response_mask if token_mask == "response" else True
        out.append(Batch(ids, att, tok, len(group)))
    return out


@torch.no_grad()
def collect_linear_stats(
    model: nn.Module,
    samples: Sequence[Sample],
    targets: Sequence[str] | None = None,
    *,
    token_mask: str = "all",
    want: Sequence[str] = ("sq_norms",),
    batch_size: int = 1,
    lora: bool = True,
) -> dict[str, LinearStats]:
    """Run `model` (a causal LM, or a peft model) on `samples` and return per-Linear statistics.

    Keys are module paths as in checkpoints (`model.layers.0.self_attn.q_proj`), plus
    `.lora_A` / `.lora_B` for LoRA layers. Statistics stay on the model's device.
    """
    collector = StatsCollector(model, targets, want=want, lora=lora)
    if not collector.stats:
        raise SurgeryError(f"no Linear module matches the targets {list(targets or [])}; check --targets")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in make_batches(samples, batch_size, token_mask):
            collector.set_token_mask(batch.token_mask)
            kwargs = {"attention_mask": batch.attention_mask.long().to(device)} if batch.padded else {}
            model(input_ids=batch.input_ids.to(device), use_cache=False, **kwargs)
            collector.count_samples(batch.size)
    finally:
        collector.remove()
        model.train(was_training)
    return collector.stats
