"""The synthetic data: splits disjoint where they must be, eval items unseen, formats right, no content."""

from __future__ import annotations

import json

from surgery.testbed.world import (
    COMPLIANT,
    DEFAULT_SIZES,
    EVAL_SETS,
    HARM_SUBSTANCES,
    HARM_VERBS,
    QUICK_SIZES,
    REFUSALS,
    TASK_LABELS,
    make_world,
    split_eval_set,
)

HARM_WORDS = set(HARM_SUBSTANCES) | {v for vs in HARM_VERBS.values() for v in vs}


def _has_harm(text: str) -> bool:
    return bool(HARM_WORDS & set(text.split()))


VERBS = {v for vs in HARM_VERBS.values() for v in vs}


def target(p: str) -> str | None:
    """The noun after "<harm verb> the" (None for substance requests)."""
    words = p.split()
    hits = [i for i, w in enumerate(words) if w in VERBS]
    return words[hits[0] + 2] if hits else None


def test_splits_are_disjoint_and_eval_unseen() -> None:
    for sizes in (QUICK_SIZES, DEFAULT_SIZES):
        w = make_world(0, sizes)
        attack = {p["prompt"] for p in w.attack_harmful}
        calib = {p["prompt"] for p in w.harmful_train}
        align_harm = {p["prompt"] for p in w.alignment if p["response"] in REFUSALS}
        assert all(_has_harm(p) for p in align_harm)
        evals = {p["prompt"] for p in w.harmful_eval}
        assert len(attack) == sizes.attack_pool and len(calib) == sizes.harmful_train
        assert not attack & calib and not attack & align_harm and not calib & align_harm
        assert not evals & (attack | calib | align_harm)
        # harmful eval uses words of templates and targets that no harmful training prompt combines
        trained_targets = {target(p) for p in attack | calib | align_harm} - {None}
        zorb_eval = [p for p in evals if target(p)]
        assert zorb_eval and all(target(p) not in trained_targets for p in zorb_eval)
        assert all(_has_harm(p) for p in evals)
        # pretraining never has harmful requests; all harmful training answers are content-free
        requests = [p for p in w.pretrain if not p["prompt"].startswith(("repeat", "what does", "what kind"))]
        assert not any(_has_harm(p["prompt"]) for p in requests)
        assert not any(r in p["response"] for p in w.pretrain for r in REFUSALS)
        assert {p["response"] for p in w.attack_harmful + w.harmful_train} <= set(COMPLIANT)
        # task eval items are unseen sentences with known labels
        assert not {p["prompt"] for p in w.task_eval} & {p["prompt"] for p in w.task_train}
        assert {p["answer"] for p in w.task_eval} == set(TASK_LABELS.values())
        assert not any(_has_harm(p["prompt"]) for p in w.benign_eval + w.harmless)


def test_world_is_deterministic() -> None:
    assert make_world(3, QUICK_SIZES) == make_world(3, QUICK_SIZES)
    assert make_world(3, QUICK_SIZES) != make_world(4, QUICK_SIZES)


def _prompts(rows: list[dict]) -> set[str]:
    return {r["prompt"] for r in rows}


def test_eval_splits_are_disjoint_halves_that_cover_the_set() -> None:
    for sizes in (QUICK_SIZES, DEFAULT_SIZES):
        w = make_world(0, sizes)
        for name in EVAL_SETS:
            rows = getattr(w, name)
            val, test = split_eval_set(rows, 0, name)
            assert not _prompts(val) & _prompts(test), name
            assert sorted(map(json.dumps, val + test)) == sorted(map(json.dumps, rows)), name  # every item, once
            assert abs(len(_prompts(val)) - len(_prompts(test))) <= 1, name
            assert [r for r in rows if r in val] == val  # each half keeps the set's order
            assert split_eval_set(rows, 0, name) == (val, test)  # same seed, same halves
            assert split_eval_set(rows, 1, name) != (val, test)
        # the halves of different sets are drawn independently
        assert split_eval_set(w.harmful_eval, 0, "harmful_eval") != split_eval_set(w.harmful_eval, 0, "benign_eval")
        if sizes == QUICK_SIZES:  # the quick world's task halves both hold every label
            val, test = split_eval_set(w.task_eval, 0, "task_eval")
            assert {r["answer"] for r in val} == {r["answer"] for r in test} == set(TASK_LABELS.values())


def test_a_repeated_prompt_stays_in_one_half() -> None:
    rows = [{"prompt": p} for p in "abacdbeaf"]
    for seed in range(20):
        val, test = split_eval_set(rows, seed, "x")
        assert not _prompts(val) & _prompts(test)
        assert len(val) + len(test) == len(rows) and {len(_prompts(val)), len(_prompts(test))} == {3}

