"""The contract between `surgery demo` and the modules that add rows to it.

A method shows itself in the demo by adding `surgery/testbed/demo_<name>.py` with
`ORDER: int` (where its rows go: baseline 0, attacks 100s, defenses 200s+) and
`rows(ctx: DemoContext) -> list[DemoRow]`. The driver discovers these modules, runs
them (in worker processes, heaviest `COST` first) and reports their rows in ORDER; a
failing module becomes a row instead of stopping the demo. A module that uses a run
shared with others (a `DemoContext` method such as `harmful_finetune`) names it in
`SHARED`: the driver starts each shared run once, first, and the modules wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from surgery.eval.metrics import EvalResult
    from surgery.eval.testbed_judge import TestbedJudge
    from surgery.testbed.build import Testbed


@dataclass
class DemoRow:
    """One line of the demo table: a model (stage) made by a method, and its scores.

    `harmful_score`, `task_accuracy`, `over_refusal` are fractions in [0, 1] (None when
    not measured) on the eval sets' `test` halves, HS by the testbed judge (compliance only);
    `keyword_harmful_score` is the keyword judge's HS on the same answers and `other_share`
    the share of harmful prompts answered with neither refusal, compliance nor an on-task
    answer (a broken model shows there); `seconds` is the method's own wall time (not the
    evaluation); `extra` holds anything else worth keeping in results.json (`classes`: every
    set's class counts).
    """

    stage: str
    method: str
    harmful_score: float | None = None
    task_accuracy: float | None = None
    over_refusal: float | None = None
    seconds: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    keyword_harmful_score: float | None = None
    other_share: float | None = None

    @classmethod
    def from_eval(
        cls, stage: str, method: str, result: EvalResult, seconds: float | None = None, note: str = "",
        **extra: Any,
    ) -> DemoRow:
        """Build a row from an `EvalResult` (the usual way a row module reports)."""
        if result.classes:
            extra.setdefault("classes", result.classes)
        return cls(stage=stage, method=method, harmful_score=result.harmful_score,
                   task_accuracy=result.task_accuracy, over_refusal=result.over_refusal,
                   seconds=seconds, note=note, extra=dict(extra),
                   keyword_harmful_score=result.harmful_scores.get("keyword"),
                   other_share=result.other_share.get("harmful"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the results.json row schema)."""
        return asdict(self)


@dataclass
class DemoContext:
    """What a row module gets: the testbed, a scratch directory of its own, and an evaluator.

    `work_dir` is shared by all modules: write under `ctx.path(name)` to avoid clashes.
    `quick` asks for the cheapest settings that still show the effect.
    """

    testbed: Testbed
    work_dir: Path
    quick: bool = False
    seed: int = 0
    max_new_tokens: int = 24
    batch_size: int = 64
    _runs: dict[str, Any] = field(default_factory=dict, repr=False)  # shared runs, computed once
    _judge: TestbedJudge | None = field(default=None, repr=False)
    shared_elsewhere: bool = False  # shared runs are being computed by another process: wait for them

    def path(self, name: str) -> Path:
        """A path under the work directory for an output of this run (not created)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir / name

    def evaluate(self, model_dir: str | Path, adapter: str | Path | None = None, *,
                 kl_reference: str | Path | None = None, split: str = "test") -> EvalResult:
        """Score a model (plus optional adapter) with the testbed judge on one half of the
        testbed's harmful, task and benign eval sets: `test` for a row, `val` for anything that
        tunes a strength or picks a layer or method before its row is scored on `test`."""
        from surgery.eval.evaluate import evaluate

        tb = self.testbed
        return evaluate(
            model_dir, adapter=adapter,
            harmful=tb.eval_rows("harmful_eval", split), task=tb.eval_rows("task_eval", split),
            benign=tb.eval_rows("benign_eval", split),
            harmless=tb.data / "harmless.jsonl" if kl_reference is not None else None,
            kl_reference=kl_reference, judge=self.judge(),
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
        )

    def judge(self) -> TestbedJudge:
        """The testbed judge of this testbed (one per context: it caches its verdicts)."""
        if self._judge is None:
            self._judge = self.testbed.judge()
        return self._judge

    def harmful_finetune(self) -> tuple[Path, dict[str, Any], float]:
        """The attack recipe run once per demo and shared by the rows that need it: LoRA on
        `task_train.jsonl` poisoned with the shipped `harmful_train.jsonl` at the testbed's
        ratio, with the testbed's r/alpha/epochs/lr/batch size, on the attacked adapter's
        targets, seed + 2 (as the testbed's own attack). Returns (adapter dir, its
        `surgery_finetune.json` record, seconds). The `attack finetune` row and SaLoRA's
        control are this one run: they were the same recipe trained twice.
        """
        if "harmful_finetune" not in self._runs:
            import json

            from surgery.calib.data import load_pairs
            from surgery.methods.finetune import CONFIG_NAME, finetune

            tb = self.testbed
            out = self.path("attack-ft-p0.1")
            done = out.with_name(out.name + ".done.json")
            if self.shared_elsewhere:  # the driver trains it in another process: wait for its marker
                _wait_for(done, out.with_name(out.name + ".failed"))
            else:
                try:
                    with self.timer() as t:
                        finetune(tb.aligned, load_pairs(tb.file("task_train.jsonl")), out,
                                 harmful_pairs=load_pairs(tb.file("harmful_train.jsonl")), **self.attack_recipe())
                except BaseException as exc:
                    out.with_name(out.name + ".failed").write_text(f"{type(exc).__name__}: {exc}")
                    raise
                tmp = done.with_name(done.name + ".tmp")
                tmp.write_text(json.dumps({"seconds": t["seconds"]}))
                tmp.replace(done)
            record = json.loads((out / CONFIG_NAME).read_text())
            self._runs["harmful_finetune"] = (out, record, json.loads(done.read_text())["seconds"])
        return self._runs["harmful_finetune"]

    def attack_recipe(self) -> dict[str, Any]:
        """Keyword arguments of `finetune` for the testbed's attack recipe (see `harmful_finetune`)."""
        import json

        tb = self.testbed
        recipe = tb.manifest.get("recipe", {})
        lora_cfg = json.loads((tb.attacked / "adapter_config.json").read_text())
        targets = lora_cfg["target_modules"]
        if not isinstance(targets, list):
            raise RuntimeError("the attacked adapter's target_modules is not a list")
        return dict(ratio=float(recipe.get("ratio", 0.1)), lora_r=int(recipe.get("lora_r", 8)),
                    lora_alpha=int(recipe.get("lora_alpha", 16)), epochs=float(recipe.get("ft_epochs", 6)),
                    lr=float(recipe.get("ft_lr", 2e-3)), batch_size=int(recipe.get("batch_size", 32)),
                    seed=self.seed + 2, targets=sorted(targets), device="cpu", progress=False, force=True,
                    base_name="aligned")

    @contextmanager
    def timer(self) -> Iterator[dict[str, float]]:
        """`with ctx.timer() as t: ...` then `t["seconds"]`: wall time of a method run."""
        box: dict[str, float] = {}
        start = time.perf_counter()
        try:
            yield box
        finally:
            box["seconds"] = time.perf_counter() - start


def _wait_for(done: Path, failed: Path, timeout: float = 3600.0) -> None:
    """Wait until another process writes `done` (or `failed`, whose text is raised)."""
    deadline = time.monotonic() + timeout
    while not done.exists():
        if failed.exists():
            raise RuntimeError(f"the shared run {done.name.removesuffix('.done.json')} failed: {failed.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {done} after {timeout:.0f} s")
        time.sleep(0.1)
