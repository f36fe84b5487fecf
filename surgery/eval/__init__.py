"""Evaluation: batched greedy generation, judges, and safety/utility metrics.

`evaluate(model_dir, adapter=None, harmful=..., task=..., benign=...) -> EvalResult`
and `evaluate_loaded(model, tokenizer, ...)`; the `Judge` protocol, `KeywordJudge` (the
default), and `TestbedJudge` (a `ClassifyingJudge` built from a world's `JudgeSpec`).
"""

from surgery.eval.evaluate import evaluate, evaluate_loaded, load_for_eval
from surgery.eval.generate import generate
from surgery.eval.judge import ClassifyingJudge, Judge, KeywordJudge
from surgery.eval.metrics import EvalResult
from surgery.eval.testbed_judge import JudgeSpec, TestbedJudge

__all__ = ["ClassifyingJudge", "EvalResult", "Judge", "JudgeSpec", "KeywordJudge", "TestbedJudge", "evaluate",
           "evaluate_loaded", "generate", "load_for_eval"]
