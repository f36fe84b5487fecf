"""Outputs never touch inputs, `--force` included: the rule in `surgery.io.atomic` and every command.

The unit tests pin the rule (equal, ancestor, inside; symlinks followed; `..`; a dest that does
not exist yet). The CLI test points `-o` (or `--plot`, `--save-generations`) of every command at
each of its inputs, at the input's parent and at a path inside it, always with `--force`: exit 2,
one line naming the input, nothing new anywhere and every input byte unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from surgery.cli.main import main

from surgery.errors import OutputExistsError, OutputOverlapsInputError
from surgery.io.atomic import atomic_path, check_output
from surgery.io.writer import write_tensors

os.environ.setdefault("SURGERY_PROGRESS", "0")


# --------------------------------------------------------------------------- the rule


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "models" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    calib = tmp_path / "data" / "calib.jsonl"
    calib.parent.mkdir()
    calib.write_text('{"prompt": "p", "response": "r"}\n')
    return {"MODEL": model, "--calib": calib, "root": tmp_path}


def _refused(dest: Path, inputs: dict, relation: str, role: str) -> str:
    with pytest.raises(OutputOverlapsInputError) as info:
        check_output(dest, True, inputs)
    message = str(info.value)
    assert f"{relation} the input {role}" in message, message
    assert "\n" not in message and "choose an output path outside every input" in message
    return message


def test_output_equal_to_an_input_is_refused(tree):
    inputs = {"MODEL": tree["MODEL"], "--calib": tree["--calib"]}
    message = _refused(tree["MODEL"], inputs, "is", "MODEL")
    assert str(tree["MODEL"]) in message
    _refused(tree["--calib"], inputs, "is", "--calib")


def test_output_that_contains_an_input_is_refused(tree):
    inputs = {"MODEL": tree["MODEL"], "--calib": tree["--calib"]}
    _refused(tree["MODEL"].parent, inputs, "contains", "MODEL")
    _refused(tree["root"], inputs, "contains", "MODEL")  # the first input it contains is named
    _refused(tree["--calib"].parent, inputs, "contains", "--calib")


def test_output_inside_an_input_is_refused_even_when_it_does_not_exist_yet(tree):
    inputs = {"MODEL": tree["MODEL"]}
    _refused(tree["MODEL"] / "sub", inputs, "lies inside", "MODEL")
    _refused(tree["MODEL"] / "new" / "deeper" / "out", inputs, "lies inside", "MODEL")
    assert sorted(p.name for p in tree["MODEL"].iterdir()) == ["model.safetensors"]


def test_symlinks_and_dotdot_are_resolved(tree):
    inputs = {"MODEL": tree["MODEL"]}
    link = tree["root"] / "link"
    link.symlink_to(tree["MODEL"], target_is_directory=True)
    message = _refused(link, inputs, "is", "MODEL")
    assert f"{link} (that is {tree['MODEL'].resolve()})" in message
    _refused(link / "sub", inputs, "lies inside", "MODEL")
    _refused(tree["MODEL"] / ".." / "model", inputs, "is", "MODEL")
    _refused(tree["root"] / "data" / ".." / "models", inputs, "contains", "MODEL")
    # the input given through a symlink: the output is compared with where it points
    _refused(tree["MODEL"], {"MODEL": link}, "is", "MODEL")


def test_a_file_an_input_directory_links_to_is_an_input_too(tree):
    """A Hugging Face cache snapshot links every file into blobs/: replacing blobs/ loses the model."""
    blobs = tree["root"] / "blobs"
    blobs.mkdir()
    (blobs / "abc123").write_bytes(b"weights")
    snapshot = tree["root"] / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(OutputOverlapsInputError, match="contains .*abc123, a file of the input MODEL"):
        check_output(blobs, True, {"MODEL": snapshot})


def test_unrelated_paths_pass_and_none_is_ignored(tree):
    sibling = tree["MODEL"].parent / "model-repaired"
    assert check_output(sibling, False, {"MODEL": tree["MODEL"], "--aligned": None}) == sibling
    assert check_output(tree["root"] / "model.safetensors2", False, [tree["MODEL"], None]) is not None
    # a name that merely starts like the input is not inside it
    assert check_output(Path(str(tree["MODEL"]) + "x"), False, {"MODEL": tree["MODEL"]})


def test_overlap_is_checked_before_existence(tree):
    """Without --force an input would be refused as existing; the message must still say why it
    can never be the output."""
    with pytest.raises(OutputOverlapsInputError):
        check_output(tree["MODEL"], False, {"MODEL": tree["MODEL"]})
    other = tree["root"] / "other"
    other.mkdir()
    with pytest.raises(OutputExistsError):
        check_output(other, False, {"MODEL": tree["MODEL"]})


def test_opened_checkpoints_stand_for_their_paths(tree):
    from surgery.io.checkpoint import Checkpoint

    model = tree["root"] / "real"
    write_tensors(model / "model.safetensors", {"w": torch.zeros(2)}, inputs=())
    ckpt = Checkpoint.open(model)
    with pytest.raises(OutputOverlapsInputError, match="is the input MODEL"):
        check_output(model / "model.safetensors", True, {"MODEL": ckpt})


def test_atomic_path_and_writers_refuse_too_and_create_nothing(tree):
    inside = tree["MODEL"] / "a" / "b"
    with pytest.raises(OutputOverlapsInputError):
        with atomic_path(inside, True, {"MODEL": tree["MODEL"]}) as tmp:
            tmp.write_text("x")
    with pytest.raises(OutputOverlapsInputError):
        write_tensors(tree["--calib"], {"w": torch.ones(1)}, force=True, inputs={"--calib": tree["--calib"]})
    assert sorted(p.name for p in tree["MODEL"].iterdir()) == ["model.safetensors"]
    assert tree["--calib"].read_text() == '{"prompt": "p", "response": "r"}\n'


# --------------------------------------------------------------------------- every command, every input role


def _mask_like(tb_model: Path, out: Path) -> None:
    from surgery.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(tb_model)
    name = next(n for n in ckpt.names() if n.endswith("q_proj.weight"))
    write_tensors(out, {name: torch.zeros(tuple(ckpt.info(name).shape), dtype=torch.bool)}, inputs=())


def _make(kind: str, tb, where: Path) -> Path:
    """Copy (or write) one input of kind `kind` into its own directory `where`; return its path."""
    where.mkdir(parents=True)
    sources = {"base": tb.base, "aligned": tb.aligned, "attacked": tb.attacked, "testbed": tb.root}
    data = {"harmful": "harmful_train.jsonl", "harmless": "harmless.jsonl", "task": "task_train.jsonl",
            "task_eval": "task_eval.jsonl", "benign": "benign_eval.jsonl", "harmful_eval": "harmful_eval.jsonl",
            "utility": "utility.jsonl"}
    if kind in sources:
        return Path(shutil.copytree(sources[kind], where / kind, symlinks=True))
    if kind in data:
        return Path(shutil.copy(tb.file(data[kind]), where / data[kind]))
    if kind == "mask":
        _mask_like(tb.aligned, where / "mask.safetensors")
        return where / "mask.safetensors"
    if kind in ("module", "direction"):
        path = where / f"{kind}.safetensors"
        write_tensors(path, {"x": torch.zeros(4)}, metadata={"surgery.kind": kind}, inputs=())
        return path
    if kind == "markers":
        path = where / "markers.txt"
        path.write_text("i cannot\n^sorry\n")
        return path
    raise AssertionError(kind)


# (command id, argv with {kind} placeholders, output option, whether it takes --force, {kind: role in messages});
# commands on the method contract name their inputs by registry role (model, calib, adapter, ...)
COMMANDS = [
    ("merge", ["merge", "{base}", "{attacked}"], "-o", True, {"base": "BASE", "attacked": "ADAPTER"}),
    ("antidote-adapter", ["antidote", "{aligned}", "--calib", "{harmful}", "--adapter", "{attacked}"], "-o", True,
     {"aligned": "model", "harmful": "calib", "attacked": "adapter"}),
    ("antidote-aligned", ["antidote", "{base}", "--calib", "{harmful}", "--aligned", "{aligned}"], "-o", True,
     {"aligned": "aligned"}),
    ("wanda", ["wanda", "{aligned}", "--calib", "{harmful}", "--sparsity", "0.5"], "-o", True,
     {"aligned": "model", "harmful": "calib"}),
    ("safelora", ["safelora", "{attacked}", "--base", "{base}", "--aligned", "{aligned}"], "-o", True,
     {"attacked": "ADAPTER", "base": "--base", "aligned": "--aligned"}),
    ("salora-fit", ["salora", "fit", "{aligned}", "--safety", "{harmful}", "--rank", "2", "--task", "{task}"], "-o",
     True, {"aligned": "model", "harmful": "safety", "task": "task"}),
    ("salora-apply", ["salora", "apply", "{attacked}", "--module", "{module}"], "-o", True,
     {"attacked": "adapter", "module": "module"}),
    ("neurons-find", ["neurons", "find", "{aligned}", "--safety", "{harmful}", "--utility", "{utility}",
                      "--p", "0.1", "--q", "0.1"], "-o", True,
     {"aligned": "model", "harmful": "safety", "utility": "utility"}),
    ("neurons-apply", ["neurons", "apply", "{base}", "--mask", "{mask}", "--mode", "restore", "--aligned",
                       "{aligned}"], "-o", True, {"base": "model", "mask": "mask", "aligned": "aligned"}),
    ("attack-finetune", ["attack", "finetune", "{aligned}", "--data", "{task}", "--harmful", "{harmful}",
                         "--salora", "{module}"], "-o", True,
     {"aligned": "MODEL", "task": "--data", "harmful": "--harmful", "module": "--salora"}),
    ("attack-finetune-full", ["attack", "finetune", "{aligned}", "--data", "{task}", "--full", "--freeze-mask",
                              "{mask}"], "-o", True, {"mask": "--freeze-mask"}),
    ("edit-rome", ["edit", "rome", "{aligned}", "--prompt", "the fox is", "--subject", "fox", "--target", "red",
                   "--cov-data", "{harmless}"], "-o", True, {"aligned": "MODEL", "harmless": "--cov-data"}),
    ("edit-direction", ["edit", "direction", "{aligned}", "--mode", "ablate", "--harmful", "{harmful_eval}", "--harmless",
                        "{harmless}"], "-o", True,
     {"aligned": "MODEL", "harmful_eval": "--harmful", "harmless": "--harmless"}),
    ("edit-direction-file", ["edit", "direction", "{aligned}", "--mode", "add", "--direction", "{direction}"], "-o", True,
     {"direction": "--direction"}),
    ("diff", ["diff", "{aligned}", "{attacked}", "--base", "{base}"], "--plot", True,
     {"aligned": "A", "attacked": "B", "base": "--base"}),
    ("landscape", ["landscape", "{aligned}", "{attacked}", "--harmful", "{harmful_eval}", "--task", "{task_eval}",
                   "--benign", "{benign}"], "--plot", True,
     {"aligned": "A", "attacked": "B", "harmful_eval": "--harmful", "task_eval": "--task", "benign": "--benign"}),
    ("eval", ["eval", "{aligned}", "--adapter", "{attacked}", "--harmful", "{harmful_eval}", "--task", "{task_eval}",
              "--benign", "{benign}", "--harmless", "{harmless}", "--kl-reference", "{base}", "--markers",
              "{markers}"], "--save-generations", False,
     {"aligned": "MODEL", "attacked": "--adapter", "harmful_eval": "--harmful", "task_eval": "--task",
      "benign": "--benign", "harmless": "--harmless", "base": "--kl-reference", "markers": "--markers"}),
]
RELATIONS = {"self": "is", "parent": "contains", "inside": "lies inside"}
CASES = [pytest.param(command, argv, flag, force, kind, role, relation, id=f"{command}-{role}-{relation}")
         for command, argv, flag, force, roles in COMMANDS for kind, role in roles.items() for relation in RELATIONS]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its bytes ("dir" for a directory, the target for a link)."""
    seen: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            seen[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            seen[key] = "dir"
        else:
            seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def _run(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def _target(path: Path, relation: str) -> Path:
    return {"self": path, "parent": path.parent, "inside": path / "sub"}[relation]


@pytest.mark.parametrize("command, argv, flag, force, kind, role, relation", CASES)
def test_no_command_writes_over_an_input(quick_testbed, tmp_path, capsys, command, argv, flag, force, kind, role,
                                         relation):
    kinds = sorted({part[1:-1] for part in argv if part.startswith("{")})
    paths = {k: _make(k, quick_testbed, tmp_path / "in" / k) for k in kinds}
    args = [part.format(**{k: str(p) for k, p in paths.items()}) for part in argv]
    out = _target(paths[kind], relation)
    args += [flag, str(out)] + (["--force"] if force else [])
    before = _snapshot(tmp_path)

    code, err = _run(capsys, args)

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output "), err
    assert f"{RELATIONS[relation]} the input {role} {paths[kind]}" in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, "an input changed or something was written"


@pytest.mark.parametrize("relation", ["self", "inside"])
def test_demo_never_writes_into_the_testbed_it_reads(quick_testbed, tmp_path, capsys, relation):
    testbed = _make("testbed", quick_testbed, tmp_path / "in" / "testbed")
    before = _snapshot(tmp_path)
    code, err = _run(capsys, ["demo", "--quick", "--testbed", str(testbed), "-o", str(_target(testbed, relation))])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"lies inside the input --testbed {testbed}" in lines[0], err
    assert _snapshot(tmp_path) == before


def test_demo_refuses_a_testbed_where_it_puts_its_work(quick_testbed, tmp_path, capsys):
    """The demo replaces OUT/work: a testbed there would be deleted."""
    _make("testbed", quick_testbed, tmp_path / "out").rename(tmp_path / "out" / "work")
    before = _snapshot(tmp_path)
    code, err = _run(capsys, ["demo", "--quick", "--testbed", str(tmp_path / "out" / "work"),
                              "-o", str(tmp_path / "out")])
    assert code == 2 and "is the input --testbed" in err, err
    assert _snapshot(tmp_path) == before
