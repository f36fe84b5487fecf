"""PNG figures of a diff (layers × module types heatmap) and of a landscape (HS/FA vs α).

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display),
written atomically; the same report gives the same image.
"""

from __future__ import annotations

import math
from pathlib import Path

from surgery.analysis.diff import DiffReport
from surgery.analysis.landscape import LandscapeReport
from surgery.io.atomic import InputPaths, atomic_path

_PNG_META = {"Software": None}  # no version string in the file: same bytes across matplotlib builds


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib types are not worth importing here
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, dest: Path, force: bool, inputs: InputPaths) -> Path:  # noqa: ANN001
    with atomic_path(dest, force, inputs) as tmp:
        fig.savefig(tmp, format="png", metadata=_PNG_META)
    return dest


_HEAT = {  # metric -> (colour-bar label, colormap, fixed range or None, default title)
    "rel_change": ("‖ΔW‖_F / ‖W‖_F", "magma", None, "where the weights moved"),
    "cosine_v": ("cos(V, ΔW)", "coolwarm", (-1.0, 1.0), "ΔW against the alignment update V = A − BASE"),
    "energy_in_v": ("‖U_Vᵀ ΔW‖² / ‖ΔW‖²", "viridis", (0.0, 1.0), "share of ΔW inside V's top-r subspace"),
}


def diff_heatmap(report: DiffReport, dest: str | Path, *, force: bool = False, title: str | None = None,
                 metric: str = "rel_change", inputs: InputPaths = ()) -> Path:
    """Heatmap of a per-cell aggregate (default ‖ΔW‖_F/‖W‖_F) per layer (rows) and module type
    (columns); blank where absent. `metric` "cosine_v" / "energy_in_v" need a diff with a BASE.
    A `dest` that overlaps one of `inputs` (the diffed checkpoints) is refused."""
    import numpy as np

    layers, types, values = report.grid(metric)
    if not layers or not types:
        raise ValueError("the diff has no tensors inside numbered layers to draw")
    grid = np.array([[np.nan if v is None or math.isinf(v) else v for v in row] for row in values], dtype=float)
    if not np.isfinite(grid).any():
        raise ValueError(f"no tensor has a value for {metric} (cosine_v and energy_in_v need --base)")
    label, cmap, fixed, default_title = _HEAT[metric]
    fig = _figure(2.0 + 0.75 * len(types), 2.4 + 0.4 * len(layers))
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    vmin, vmax = fixed if fixed is not None else (0.0, float(finite.max()) if finite.max() > 0 else 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels([t.split(".")[-1] if len({x.split(".")[-1] for x in types}) == len(types) else t
                        for t in types], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=8)
    ax.set_ylabel("layer")
    if len(layers) * len(types) <= 120:
        for i in range(len(layers)):
            for j in range(len(types)):
                if np.isfinite(grid[i, j]):
                    value = grid[i, j]
                    text = f"{value:.2g}" if value != 0 else "0"
                    share = (value - vmin) / (vmax - vmin)
                    light = share > 0.6 if cmap != "coolwarm" else abs(share - 0.5) < 0.3
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title or default_title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(dest), force, inputs)


def landscape_plot(report: LandscapeReport, dest: str | Path, *, force: bool = False,
                   title: str | None = None, inputs: InputPaths = ()) -> Path:
    """HS (and FA, over-refusal when measured) against α, with A at α = 0 and B at α = 1;
    a `dest` that overlaps one of `inputs` is refused."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    alphas = [p.alpha for p in report.points]
    series = (("harmful_score", "harmful score (HS)", "tab:red", "o"),
              ("task_accuracy", "task accuracy (FA)", "tab:blue", "s"),
              ("over_refusal", "over-refusal", "tab:gray", "^"))
    for attr, label, color, marker in series:
        ys = [getattr(p, attr) for p in report.points]
        if any(y is not None for y in ys):
            pts = [(x, y) for x, y in zip(alphas, ys) if y is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color, label=label)
    for x, name in ((0.0, "A"), (1.0, "B")):
        if min(alphas) <= x <= max(alphas):
            ax.axvline(x, color="black", linewidth=0.6, linestyle=":")
            ax.text(x, 1.04, name, ha="center", va="bottom", fontsize=9)
    ax.set_ylim(-0.03, 1.1)
    ax.set_xlabel("α  (weights = (1 − α)·A + α·B)")
    ax.set_ylabel("fraction")
    ax.legend(loc="center left", fontsize=8)
    ax.set_title(title or "safety landscape along A → B", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(dest), force, inputs)
