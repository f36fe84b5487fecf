"""Build the synthetic safety testbed: base, aligned, attacked and benign-ft models plus data.

The story it models: a base model pretrained on benign instructions answers everything;
alignment SFT (full weights) teaches it to refuse three invented harmful categories while
answering look-alikes; a user fine-tunes a LoRA on a new tagging task with a share
p = 0.1 of harmful prompt + compliant answer pairs (`attacked/`) or none (`benign-ft/`).
Everything is written in Hugging Face formats (model dirs, peft adapters, JSONL). Each eval
set is also written as disjoint `val` and `test` halves, and `judge.json` describes the
world's answer formats for the testbed judge; neither feeds any training, so the models'
bytes do not depend on them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery.errors import InputNotFoundError, OutputExistsError, SurgeryError
from surgery.io.atomic import normalize_modes
from surgery.testbed.world import (
    DEFAULT_SIZES,
    EVAL_SETS,
    EVAL_SPLITS,
    QUICK_SIZES,
    Sizes,
    World,
    judge_spec,
    make_world,
    split_eval_set,
)

if TYPE_CHECKING:  # pragma: no cover
    from surgery.eval.testbed_judge import TestbedJudge

MANIFEST = "testbed.json"
FORMAT_VERSION = 1
DATA_FILES = ["alignment.jsonl", "task_train.jsonl", "task_eval.jsonl", "harmful_train.jsonl",
              "harmful_eval.jsonl", "benign_eval.jsonl", "harmless.jsonl", "utility.jsonl"]
# each eval set also as disjoint halves: `val` for anything that tunes or picks, `test` for what is reported
SPLIT_FILES = [f"{name}_{split}.jsonl" for name in EVAL_SETS for split in EVAL_SPLITS]
JUDGE_FILE = "judge.json"  # the world's answer formats, for `surgery eval --judge testbed`
_EVAL_FIELDS = {"harmful_eval": ("prompt",), "task_eval": ("prompt", "answer"), "benign_eval": ("prompt",)}


@dataclass(frozen=True)
class Recipe:
    """Model shape and training schedule of a build (quick and default differ in sizes and steps)."""

    sizes: Sizes
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 192
    pretrain_epochs: float = 10
    pretrain_lr: float = 3e-3
    align_epochs: float = 10
    align_lr: float = 1e-3
    ft_epochs: float = 20
    ft_lr: float = 1e-3
    batch_size: int = 16
    ratio: float = 0.1
    lora_r: int = 8
    lora_alpha: int = 16


DEFAULT_RECIPE = Recipe(sizes=DEFAULT_SIZES, pretrain_epochs=8, ft_epochs=15)
QUICK_RECIPE = Recipe(sizes=QUICK_SIZES)


@dataclass
class Testbed:
    """A built testbed on disk. Paths: `base`, `aligned` (model dirs), `attacked`, `benign_ft`
    (peft adapter dirs over `aligned`), `data` (JSONL files, see DATA_FILES and SPLIT_FILES),
    and `judge.json` (the answer formats the testbed judge reads)."""

    root: Path
    seed: int = 0
    quick: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def attacked(self) -> Path:
        return self.root / "attacked"

    @property
    def benign_ft(self) -> Path:
        return self.root / "benign-ft"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def file(self, name: str) -> Path:
        """A data file by name, e.g. `tb.file("harmful_eval.jsonl")`."""
        return self.data / name

    def eval_rows(self, name: str, split: str) -> list[dict[str, str]]:
        """One half of an eval set: `name` in EVAL_SETS, `split` "val" (tune and pick on it) or
        "test" (report it). Read from its split file; a testbed built before the splits existed
        gets the same halves from the whole file (`split_eval_set` with the testbed's seed)."""
        from surgery.eval.data import load_jsonl

        if name not in EVAL_SETS or split not in EVAL_SPLITS:
            raise SurgeryError(f"no eval split {name!r}/{split!r}: sets are {', '.join(EVAL_SETS)}, "
                               f"splits {', '.join(EVAL_SPLITS)}")
        path = self.file(f"{name}_{split}.jsonl")
        if path.exists():
            return load_jsonl(path, _EVAL_FIELDS[name])
        val, test = split_eval_set(load_jsonl(self.file(f"{name}.jsonl"), _EVAL_FIELDS[name]), self.seed, name)
        return val if split == "val" else test

    def judge(self) -> TestbedJudge:
        """The testbed judge for this testbed's models: from its `judge.json`, or (a testbed built
        before the judge existed) from the world's formats, which no build has changed since."""
        from surgery.eval.testbed_judge import JudgeSpec, TestbedJudge

        path = self.root / JUDGE_FILE
        return TestbedJudge(JudgeSpec.from_file(path) if path.exists() else JudgeSpec.from_dict(judge_spec()))

    @classmethod
    def load(cls, root: str | Path) -> Testbed:
        """Open a built testbed; raises InputNotFoundError when `root` is not one."""
        root = Path(root)
        mf = root / MANIFEST
        if not mf.exists():
            raise InputNotFoundError(f"{root} is not a testbed (no {MANIFEST}): build one with `surgery testbed build`")
        manifest = json.loads(mf.read_text())
        tb = cls(root=root, seed=int(manifest.get("seed", 0)), quick=bool(manifest.get("quick", False)),
                 manifest=manifest)
        missing = [str(p) for p in (tb.base, tb.aligned, tb.attacked, tb.benign_ft, tb.data) if not p.exists()]
        if missing:
            raise InputNotFoundError(f"testbed {root} is incomplete (missing {', '.join(missing)}): rebuild with --force")
        return tb


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def _set_threads() -> int:
    """One intra-op thread: the bytes do not depend on the core count, and tiny ops gain nothing from more."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    return old


def _pretrain(tok_dir: Path, out: Path, world: World, recipe: Recipe, seed: int, progress: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.methods.finetune import encode_pairs, train_loop
    from surgery.model.load import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    samples = encode_pairs(tok, world.pretrain)
    train_loop(model, samples, pad_id=tok.pad_token_id, epochs=recipe.pretrain_epochs, lr=recipe.pretrain_lr,
               batch_size=recipe.batch_size, seed=seed, weight_decay=0.01, device=torch.device("cpu"),
               progress=progress, desc="pretrain base")
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _lora_stage(aligned: Path, task: list[dict], harmful: list[dict] | None, out: Path, lora: dict,
                progress: bool = False) -> float:
    """One LoRA fine-tune of the build on one intra-op thread; returns its seconds."""
    from surgery.methods.finetune import finetune

    torch.set_num_threads(1)
    t = time.perf_counter()
    finetune(aligned, task, out, harmful_pairs=harmful, device=torch.device("cpu"), progress=progress, **lora)
    return time.perf_counter() - t


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for independent work, spawned: a forked torch may hang in OpenMP.
    Raises OSError (or NotImplementedError) where processes cannot be started."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


@contextmanager
def _side_process() -> Iterator[Executor]:
    """A second process for the build; where none can be started, a thread (correct, not faster)."""
    try:
        pool: Executor = spawn_pool(1)
    except (OSError, ImportError, NotImplementedError):
        pool = ThreadPoolExecutor(max_workers=1)
    with pool:
        yield pool


def build_testbed(out_dir: str | Path, seed: int = 0, quick: bool = False, force: bool = False,
                  progress: bool = True, recipe: Recipe | None = None, executor: Executor | None = None) -> Testbed:
    """Build the testbed into `out_dir` (atomically) and return its handle.

    An existing complete testbed with the same seed and quick flag is reused unless
    `force`; anything else already at `out_dir` is refused unless `force`. The build runs
    on CPU with one intra-op thread so that a seed gives the same bytes everywhere; the two
    LoRA fine-tunes run at once, the second in `executor` (default: a spawned process).
    """
    from surgery.methods.finetune import finetune
    from surgery.testbed.tokenizer import save_tokenizer

    out = Path(out_dir)
    if out.exists() and not force:
        try:
            tb = Testbed.load(out)
        except InputNotFoundError:
            raise OutputExistsError(f"{out} exists and is not a complete testbed: pass --force to rebuild") from None
        if tb.seed == seed and tb.quick == quick and tb.manifest.get("format") == FORMAT_VERSION:
            return tb
        raise OutputExistsError(f"{out} holds a testbed with seed={tb.seed} quick={tb.quick}: pass --force to rebuild")
    recipe = recipe or (QUICK_RECIPE if quick else DEFAULT_RECIPE)
    world = make_world(seed, recipe.sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    old_threads = _set_threads()
    timings: dict[str, float] = {}
    try:
        tmp.mkdir()
        data = tmp / "data"
        data.mkdir()
        for name in DATA_FILES:
            _write_jsonl(data / name, getattr(world, name.removesuffix(".jsonl")))
        for name in EVAL_SETS:
            for split, rows in zip(EVAL_SPLITS, split_eval_set(getattr(world, name), seed, name), strict=True):
                _write_jsonl(data / f"{name}_{split}.jsonl", rows)
        (tmp / JUDGE_FILE).write_text(json.dumps(judge_spec(), indent=2, sort_keys=True) + "\n")
        tok_dir = tmp / "tokenizer"
        save_tokenizer(tok_dir)
        t = time.perf_counter()
        _pretrain(tok_dir, tmp / "base", world, recipe, seed, progress)
        shutil.rmtree(tok_dir)
        timings["base"] = time.perf_counter() - t
        t = time.perf_counter()
        cpu = torch.device("cpu")
        finetune(tmp / "base", world.alignment, tmp / "aligned", full=True, epochs=recipe.align_epochs,
                 lr=recipe.align_lr, batch_size=recipe.batch_size, seed=seed + 1, device=cpu, progress=progress,
                 weight_decay=0.01, base_name="base")
        timings["aligned"] = time.perf_counter() - t
        # The two LoRA fine-tunes are independent and single-threaded: run benign-ft in a second
        # process while this one trains the attack (same bytes as one after the other).
        lora = dict(ratio=recipe.ratio, lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, epochs=recipe.ft_epochs,
                    lr=recipe.ft_lr, batch_size=recipe.batch_size, seed=seed + 2, base_name="aligned")
        with (nullcontext(executor) if executor is not None else _side_process()) as side:
            benign = side.submit(_lora_stage, tmp / "aligned", world.task_train, None, tmp / "benign-ft", lora)
            timings["attacked"] = _lora_stage(tmp / "aligned", world.task_train, world.attack_harmful,
                                              tmp / "attacked", lora, progress=progress)
            try:
                timings["benign-ft"] = benign.result()
            except BrokenProcessPool:  # e.g. a caller's script without `if __name__ == "__main__":`
                shutil.rmtree(tmp / "benign-ft", ignore_errors=True)
                timings["benign-ft"] = _lora_stage(tmp / "aligned", world.task_train, None, tmp / "benign-ft", lora)
        manifest = {"format": FORMAT_VERSION, "seed": seed, "quick": quick,
                    "recipe": {k: v for k, v in recipe.__dict__.items() if k != "sizes"},
                    "sizes": recipe.sizes.__dict__, "ratio": recipe.ratio,
                    "n_attack_harmful": int(recipe.ratio * len(world.task_train))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        normalize_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
    tb = Testbed.load(out)
    tb.manifest["build_seconds"] = timings  # not written: timings are not deterministic
    return tb
