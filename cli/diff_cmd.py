"""`surgery diff A B [--base BASE]`: where and how the weights moved, per tensor, layer and module type."""

from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.table import Table

from surgery.analysis.diff import (
    ADAPTER_MISMATCH,
    GRID_METRICS,
    MISSING_IN_A,
    MISSING_IN_B,
    SHAPE_MISMATCH,
    DiffReport,
    diff_checkpoints,
)
from surgery.errors import SurgeryError
from surgery.io.atomic import check_output


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def _print(report: DiffReport, rows: int) -> None:
    detected = Console().width
    console = Console(width=max(detected, 150))  # a piped table stays readable; a wide terminal uses its width
    with_base = report.base is not None
    table = Table(title=f"most moved tensors ({min(rows, len(report.tensors))} of {len(report.tensors)})",
                  title_justify="left")
    for col in ("tensor", "‖ΔW‖/‖W‖", "cos(A,B)", "max|ΔW|", "changed", "stable rk", "eff. rk", "top σ"):
        table.add_column(col, justify="left" if col == "tensor" else "right", no_wrap=col == "tensor")
    if with_base:
        for col in ("cos(V,ΔW)", "angles°", "in V"):
            table.add_column(col, justify="right")
    for t in report.sorted_by_movement()[:rows]:
        m = t.metrics
        if m is None:
            table.add_row(_short(t.name), f"[yellow]{t.status}[/yellow]", t.note, *[""] * (5 + 3 * with_base))
            continue
        sv = ", ".join(_num(s, ".2g") for s in m.singular_values[:3])
        cells = [_short(t.name), _num(m.rel_change), _num(m.cosine, ".4f"), _num(m.max_abs),
                 "-" if m.changed_share is None else f"{100 * m.changed_share:.1f}%",
                 _num(m.stable_rank, ".2f"), _num(m.effective_rank, ".2f"), sv]
        if with_base:
            angles = m.principal_angles
            ang = "-" if not angles else f"{math.degrees(min(angles)):.0f}–{math.degrees(max(angles)):.0f}"
            cells += [_num(m.cosine_v, ".3f"), ang,
                      "-" if m.energy_in_v is None else f"{100 * m.energy_in_v:.0f}%"]
        table.add_row(*cells)
    console.print(table)
    for title, aggs in (("by layer", report.by_layer()), ("by module type", report.by_type())):
        agg_table = Table(title=title, title_justify="left")
        for col in ("group", "tensors", "changed", "‖ΔW‖/‖W‖") + (("cos(V,ΔW)", "in V") if with_base else ()):
            agg_table.add_column(col, justify="left" if col == "group" else "right")
        for agg in aggs:
            cells = [agg.key, str(agg.tensors), str(agg.changed), _num(agg.rel_change)]
            if with_base:
                cells += [_num(agg.cosine_v, ".3f"),
                          "-" if agg.energy_in_v is None else f"{100 * agg.energy_in_v:.0f}%"]
            agg_table.add_row(*cells)
        console.print(agg_table)
    problems = [t for t in report.tensors if t.status in (MISSING_IN_A, MISSING_IN_B, SHAPE_MISMATCH,
                                                           ADAPTER_MISMATCH)]
    for t in problems[:20]:
        console.print(f"[yellow]{t.status}[/yellow] {t.name}: {t.note}")
    if len(problems) > 20:
        console.print(f"[yellow]... and {len(problems) - 20} more problems (see --json)[/yellow]")
    console.print(f"{len(report.changed)} of {len(report.tensors)} tensors changed"
                  f" ({report.mode}, {report.seconds:.1f} s)")


@click.command("diff")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The model A was aligned from: compare ΔW with the alignment update V = A − BASE.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--plot", type=click.Path(path_type=str), default=None,
              help="Write a heatmap PNG (layers × module types, ‖ΔW‖/‖W‖).")
@click.option("--plot-metric", type=click.Choice(GRID_METRICS), default="rel_change", show_default=True,
              help="What the heatmap shows per cell (cosine_v and energy_in_v need --base).")
@click.option("--top", type=click.IntRange(0), default=8, show_default=True,
              help="Singular values of ΔW reported per tensor.")
@click.option("--rank", type=click.IntRange(1), default=8, show_default=True,
              help="Dimension r of the subspaces for principal angles and energy share.")
@click.option("--rows", type=click.IntRange(1), default=20, show_default=True, help="Tensors shown in the table.")
@click.option("--exact", is_flag=True, help="Exact SVDs for every tensor (default: randomized beyond 1024).")
@click.option("--atol", type=click.FloatRange(0), default=0.0, show_default=True,
              help="An entry counts as changed when |ΔW| exceeds this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVDs.")
@click.option("--title", default=None, help="Title of the --plot figure.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@click.option("--allow-pickle", is_flag=True, help="Read pickle (.bin) weights with weights_only=True.")
def diff_command(a: str, b: str, base: str | None, as_json: bool, plot: str | None, plot_metric: str, top: int,
                 rank: int, rows: int, exact: bool, atol: float, seed: int, title: str | None, force: bool,
                 allow_pickle: bool) -> None:
    """Compare checkpoint A with B: a checkpoint, or a LoRA adapter over A (kept factored).

    Per tensor: ‖ΔW‖/‖W‖, cosine of the weights, max |ΔW|, share of changed entries,
    stable and effective rank and top singular values of ΔW; with --base also
    cos(V, ΔW), principal angles between their top-r left subspaces and the share of
    ΔW's energy inside V's. Missing keys and shape mismatches are listed, not fatal.
    """
    inputs = {"A": a, "B": b, "--base": base}
    if plot is not None:
        check_output(plot, force, inputs)
        if plot_metric != "rel_change" and base is None:
            raise SurgeryError(f"--plot-metric {plot_metric} compares ΔW with V = A − BASE: give --base")
    report = diff_checkpoints(a, b, base=base, rank=rank, top=top, exact=True if exact else None, seed=seed,
                              atol=atol, allow_pickle=allow_pickle)
    if plot is not None:
        from surgery.analysis.plots import diff_heatmap

        try:
            diff_heatmap(report, plot, force=force, metric=plot_metric, title=title, inputs=inputs)
        except ValueError as exc:
            raise SurgeryError(f"cannot draw {plot}: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print(report, rows)
    if plot is not None:
        Console().print(f"heatmap written to [bold]{plot}[/bold]")


COMMANDS = [diff_command]
