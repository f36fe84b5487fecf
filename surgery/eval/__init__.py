"""Evaluation: batched greedy generation, refusal judges, and safety/utility metrics.

`evaluate(model_dir, adapter=None, harmful=..., task=..., benign=...) -> EvalResult`
and `evaluate_loaded(model, tokenizer, ...)`; `KeywordJudge` and the `Judge` protocol.
"""

from surgery.eval.evaluate import evaluate, evaluate_loaded, load_for_eval
from surgery.eval.generate import generate
from surgery.eval.judge import Judge, KeywordJudge
from surgery.eval.metrics import EvalResult

__all__ = ["EvalResult", "Judge", "KeywordJudge", "evaluate", "evaluate_loaded", "generate", "load_for_eval"]
