"""`surgery diff` and `surgery landscape` from the command line: JSON, table, PNG, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from surgery.cli.main import main

from tests.factories import make_adapter, make_base

os.environ.setdefault("SURGERY_PROGRESS", "0")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    a = make_base(root / "a", "llama", seed=0)
    return {"a": a, "b": make_base(root / "b", "llama", seed=1),
            "adapter": make_adapter(a, root / "adapter", target_modules=["k_proj", "up_proj"]), "root": root}


def test_diff_json_table_and_plot(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "heat.png"
    code, out, _ = run(["diff", str(pair["a"]), str(pair["adapter"]), "--json", "--plot", str(png),
                        "--rank", "2", "--top", "3", "--base", str(pair["b"])], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["mode"] == "adapter" and report["rank"] == 2
    assert {t["module_type"] for t in report["tensors"] if t["status"] == "changed"} == {
        "self_attn.k_proj", "mlp.up_proj"}
    first = report["tensors"][0]
    assert len(first["singular_values"]) == 3 and len(first["principal_angles"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plot is refused when it exists (exit 2, nothing computed), replaced with --force
    code, _, err = run(["diff", str(pair["a"]), str(pair["b"]), "--plot", str(png)], capsys)
    assert code == 2 and "--force" in err
    code, out, _ = run(["diff", str(pair["a"]), str(pair["b"]), "--plot", str(png), "--force", "--rows", "5"],
                       capsys)
    assert code == 0 and "most moved tensors (5 of 21)" in out and "by module type" in out


def test_diff_bad_input_is_exit_2(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["diff", str(pair["a"]), str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_landscape_cli_rejects_mismatch_before_eval(pair: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    save_file({"x": __import__("torch").ones(2)}, str(tmp_path / "model.safetensors"))
    h = tmp_path / "h.jsonl"
    h.write_text('{"prompt": "hello"}\n')
    code, _, err = run(["landscape", str(pair["a"]), str(tmp_path), "--harmful", str(h)], capsys)
    assert code == 2 and "same tensors" in err
    code, _, err = run(["landscape", str(pair["a"]), str(pair["b"]), "--harmful", str(h), "--steps", "1"], capsys)
    assert code == 2


def test_heatmap_of_subspace_metrics(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from surgery.analysis.diff import diff_checkpoints

    png = tmp_path / "energy.png"
    code, _, err = run(["diff", str(pair["a"]), str(pair["adapter"]), "--plot", str(png), "--plot-metric",
                        "energy_in_v"], capsys)
    assert code == 2 and "--base" in err and not png.exists()
    code, _, _ = run(["diff", str(pair["a"]), str(pair["adapter"]), "--base", str(pair["b"]), "--plot", str(png),
                      "--plot-metric", "energy_in_v", "--rank", "2"], capsys)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    report = diff_checkpoints(pair["a"], pair["adapter"], base=pair["b"], rank=2)
    layers, types, grid = report.grid("energy_in_v")
    for i, layer in enumerate(layers):
        for j, typ in enumerate(types):
            rows = [t for t in report.tensors if str(t.layer) == layer and t.module_type == typ]
            shares = [t.metrics.energy_in_v for t in rows if t.metrics.energy_in_v is not None]
            if shares:  # one tensor per cell here: the cell is that tensor's share
                assert grid[i][j] == pytest.approx(shares[0])
            else:
                assert grid[i][j] is None
