"""`surgery testbed build`: build the synthetic safety testbed (models, adapters, data)."""

from __future__ import annotations

import json
import sys
import time

import click


@click.group("testbed")
def testbed_group() -> None:
    """The built-in synthetic safety testbed."""


@testbed_group.command("build")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Testbed directory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Smaller data and shorter training (for tests; same targets).")
@click.option("--force", is_flag=True, help="Rebuild even if OUT exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the testbed's paths as JSON on stdout.")
def build_command(out: str, seed: int, quick: bool, force: bool, as_json: bool) -> None:
    """Build base/, aligned/ (models), attacked/, benign-ft/ (LoRA adapters over aligned) and data/.

    A complete testbed with the same seed and --quick flag at OUT is reused.
    """
    from transformers.utils import logging as hf_logging

    from surgery.testbed import build_testbed

    hf_logging.disable_progress_bar()  # our own progress and tables only
    hf_logging.set_verbosity_error()

    start = time.perf_counter()
    tb = build_testbed(out, seed=seed, quick=quick, force=force)
    info = {"root": str(tb.root), "base": str(tb.base), "aligned": str(tb.aligned), "attacked": str(tb.attacked),
            "benign_ft": str(tb.benign_ft), "data": str(tb.data), "seed": tb.seed, "quick": tb.quick,
            "seconds": round(time.perf_counter() - start, 2)}
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for key, value in info.items():
        click.echo(f"{key:10s} {value}")


COMMANDS = [testbed_group]
