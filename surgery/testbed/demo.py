"""The demo driver: build or reuse the testbed, run every row module, report.

Row modules are `surgery/testbed/demo_<name>.py` exposing `ORDER: int` and
`rows(ctx) -> list[DemoRow]` (see `demo_api`). They run in (ORDER, name) order; a module
that raises becomes a row with the error in its note, and the demo goes on.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import pkgutil
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from surgery.io.atomic import check_no_overlap
from surgery.testbed.build import Testbed, build_testbed, spawn_pool
from surgery.testbed.demo_api import DemoContext, DemoRow

log = logging.getLogger(__name__)

DEFAULT_ORDER = 500


@dataclass
class DemoReport:
    """What a demo run produced: its rows, where it wrote, and how long it took."""

    rows: list[DemoRow]
    out_dir: Path
    testbed: Testbed
    results_path: Path
    chart_path: Path | None
    seconds: float
    failures: list[str] = field(default_factory=list)


def discover_row_modules() -> list[tuple[int, str, ModuleType | Exception]]:
    """Import every `surgery.testbed.demo_<name>` module (not demo_api) and sort by (ORDER, name).

    A module that fails to import is returned as its exception, to be reported as a row.
    """
    import surgery.testbed as package

    found: list[tuple[int, str, ModuleType | Exception]] = []
    for info in pkgutil.iter_modules(package.__path__):
        name = info.name
        if not name.startswith("demo_") or name == "demo_api":
            continue
        short = name.removeprefix("demo_")
        try:
            module = importlib.import_module(f"surgery.testbed.{name}")
        except Exception as exc:  # noqa: BLE001 - one broken module must not stop the demo
            found.append((DEFAULT_ORDER, short, exc))
            continue
        if not callable(getattr(module, "rows", None)):
            continue
        found.append((int(getattr(module, "ORDER", DEFAULT_ORDER)), short, module))
    return sorted(found, key=lambda t: (t[0], t[1]))


def _failure_row(name: str, exc: BaseException) -> DemoRow:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return DemoRow(stage=name, method=name, note=f"failed: {type(exc).__name__}: {exc}"[:300],
                   extra={"error": True, "traceback": tb[-4000:]})


def _run_module(name: str, module: ModuleType | Exception | None, ctx: DemoContext,
                quiet: bool = False) -> tuple[list[DemoRow], bool]:
    """Rows of one module, or one failure row; (rows, failed). `module` None: import it here
    (a worker process). `quiet`: silence transformers' bars and set one torch thread (a worker
    shares the cores with another)."""
    t0 = time.perf_counter()
    try:
        if quiet:
            import torch
            from transformers.utils import logging as hf_logging

            torch.set_num_threads(1)
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        if module is None:
            module = importlib.import_module(f"surgery.testbed.demo_{name}")
        if isinstance(module, Exception):
            raise module
        new, failed = list(module.rows(ctx)), False
    except Exception as exc:  # noqa: BLE001 - report and go on
        new, failed = [_failure_row(name, exc)], True
    for r in new:
        r.extra.setdefault("module", name)
        r.extra.setdefault("module_seconds", round(time.perf_counter() - t0, 3))
    return new, failed


@contextmanager
def _workers(jobs: int) -> Iterator[Executor | None]:
    """`jobs` spawned worker processes, started (and their imports done) while the testbed builds;
    None (run in this process) for one job or where processes cannot be started."""
    try:
        pool = spawn_pool(jobs) if jobs > 1 else None
    except (OSError, ImportError, NotImplementedError):  # no processes here: run in this one
        pool = None
    if pool is None:
        yield None
        return
    with pool:
        for _ in range(jobs):
            pool.submit(_warm_up)
        yield pool


def _warm_up() -> None:
    """Import what every worker task needs, one torch thread, transformers' bars off."""
    import torch
    from transformers.utils import logging as hf_logging

    import surgery.eval.evaluate  # noqa: F401 - what every row module needs
    import surgery.methods.finetune  # noqa: F401

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _run_in_pool(pool: Executor, selected: list[tuple[str, ModuleType | Exception]],
                 ctx: DemoContext) -> Iterator[tuple[list[DemoRow], bool]]:
    """Run the modules in the pool, heaviest first (their `COST` hint), after the shared runs they
    declare (`SHARED`), which go first so that a module waiting for one never blocks it.
    Yields the results in `selected` order, each as soon as it and those before it are done."""
    shared = sorted({run for _, module in selected for run in getattr(module, "SHARED", ())})
    for run in shared:
        pool.submit(_run_shared, run, ctx)
    waiting = dataclasses.replace(ctx, shared_elsewhere=bool(shared))
    by_cost = sorted(range(len(selected)), key=lambda i: -float(getattr(selected[i][1], "COST", 1.0)))
    futures: dict[int, Future] = {}
    for i in by_cost:
        name, module = selected[i]
        futures[i] = pool.submit(_run_module, name, module if isinstance(module, Exception) else None, waiting, True)
    for i, (name, module) in enumerate(selected):
        try:
            yield futures[i].result()
        except BrokenProcessPool:  # no usable workers (a caller's script without a main guard)
            yield _run_module(name, module, ctx)


def _run_shared(run: str, ctx: DemoContext) -> None:
    """Compute one shared run (a `DemoContext` method) in a worker; its waiters poll its marker.
    Errors are left to the marker and to the modules that need the run."""
    import torch

    torch.set_num_threads(1)
    try:
        getattr(ctx, run)()
    except Exception:  # noqa: BLE001 - the waiting modules report it
        pass


def run_demo(out_dir: str | Path = "surgery-demo", *, quick: bool = False, seed: int = 0,
             only: list[str] | None = None, progress: bool = True, testbed: Testbed | str | Path | None = None,
             on_row: Callable[[str, list[DemoRow]], None] | None = None, jobs: int = 2) -> DemoReport:
    """Run the demo into `out_dir`: testbed[-quick]-seedN/ (built once, reused), work/ (fresh each run),
    results.json and hs_vs_fa.png. `only` restricts to the named row modules; `testbed` uses
    an existing testbed (handle or directory) instead of building one under `out_dir`.

    With `jobs` > 1 the row modules run in that many worker processes (one torch thread each:
    the demo's tiny models are bound by Python overhead, so two processes do twice the work of
    one on two cores). Shared runs the modules declare (`SHARED`, names of `DemoContext`
    methods) are computed once here first. Rows are reported in module order either way.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if testbed is not None:  # what the demo replaces under `out` must not touch the testbed it reads
        given = {"--testbed": testbed.root if isinstance(testbed, Testbed) else testbed}
        for written in (out / "work", out / "results.json", out / "hs_vs_fa.png"):
            check_no_overlap(written, given)
    out.mkdir(parents=True, exist_ok=True)
    with _workers(jobs) as pool:
        if testbed is None:
            tb_dir = out / f"testbed{'-quick' if quick else ''}-seed{seed}"
            tb = build_testbed(tb_dir, seed=seed, quick=quick, progress=progress, executor=pool)
        else:
            tb = testbed if isinstance(testbed, Testbed) else Testbed.load(testbed)
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        ctx = DemoContext(testbed=tb, work_dir=work, quick=quick, seed=seed)
        selected = [(name, module) for _order, name, module in discover_row_modules() if not only or name in only]
        if pool is None or len(selected) < 2:
            results: Iterator[tuple[list[DemoRow], bool]] = (_run_module(n, m, ctx) for n, m in selected)
        else:
            results = _run_in_pool(pool, selected, ctx)
        rows: list[DemoRow] = []
        failures: list[str] = []
        for (name, _), (new, failed) in zip(selected, results, strict=True):  # in module order, as they finish
            rows.extend(new)
            log.info("demo %s: %d rows%s", name, len(new), " (failed: see its row)" if failed else "")
            if failed:
                failures.append(name)
            if on_row is not None:
                on_row(name, new)
    seconds = time.perf_counter() - start
    summary = {
        "seed": seed, "quick": quick, "testbed": str(tb.root), "seconds": round(seconds, 2),
        "build_seconds": tb.manifest.get("build_seconds"), "failures": failures, "jobs": jobs,
        "rows": [r.to_dict() for r in rows],
    }
    results_path = out / "results.json"
    results_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    chart = write_chart(rows, out / "hs_vs_fa.png")
    return DemoReport(rows=rows, out_dir=out, testbed=tb, results_path=results_path, chart_path=chart,
                      seconds=seconds, failures=failures)


def write_chart(rows: list[DemoRow], path: Path) -> Path | None:
    """A PNG scatter of harmful score against task accuracy, one labelled point per row."""
    points = [r for r in rows if r.harmful_score is not None and r.task_accuracy is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(points, 1):
        x, y = 100 * float(r.task_accuracy), 100 * float(r.harmful_score)  # type: ignore[arg-type]
        label = r.stage if r.stage == r.method else f"{r.stage} ({r.method})"
        ax.scatter([x], [y], s=45, color=cmap((i - 1) % 20), label=f"{i}. {label}", zorder=3)
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    ax.set_xlabel("task accuracy FA (%)  (higher is better)")
    ax.set_ylabel("harmful score HS (%)  (lower is safer)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("surgery demo: safety vs utility on the synthetic testbed")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def format_value(v: Any) -> str:
    """A fraction as a percentage, '-' when absent."""
    return "-" if v is None else f"{100 * float(v):.1f}"
