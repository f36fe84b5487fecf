"""Pipeline benchmark: `surgery merge` against the transformers + peft path and the safetensors floor.

Builds (in a temporary directory, seeded) a synthetic Llama-shaped bf16 checkpoint of
at least 1 GB, sharded like a Hub checkpoint, and a random r=16 LoRA adapter on every
projection. Then, each in its own subprocess so that peak RSS is that path's alone:

- surgery: `surgery merge BASE ADAPTER -o OUT`;
- peft: `AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` +
  `merge_and_unload` + `save_pretrained`;
- floor: `safetensors.torch.load_file` / `save_file` per shard (read and write once).

Wall time is measured around each subprocess (interpreter start and imports included,
as a user sees them); peak RSS comes from `wait4` for that child. Results go to
`benchmarks/results/pipeline_merge-<machine>.json` and `.md`.

    python benchmarks/pipeline_merge.py [--layers 26] [--repeat 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The parent stays lean (no torch) so that children forked from it start small: a
# child's peak RSS as wait4 reports it includes what it inherited before exec.
from _common import FLOOR_SCRIPT, cpu_model, machine_name, measure_rss, warm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

def build_inputs(root: Path, layers: int, seed: int) -> tuple[Path, Path, dict]:
    """A Llama-shaped bf16 checkpoint (streamed to disk, sharded at 500 MB) and an r=16 adapter."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from surgery.io.adapter import write_adapter
    from surgery.io.writer import CheckpointWriter, TensorSpec

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=layers,
        num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    base = root / "base"
    config_dir = root / "config"
    config.save_pretrained(config_dir)
    gen = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    with CheckpointWriter(base, specs, shard_size=500_000_000, copy_files_from=[config_dir / "config.json"]) as w:
        for spec in specs:
            if len(spec.shape) == 1:
                w.write(spec.name, torch.ones(spec.shape, dtype=torch.bfloat16))
            else:
                w.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16))
    r = 16
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    adapter = root / "adapter"
    write_adapter(adapter, {"r": r, "lora_alpha": 32, "target_modules": TARGETS, "peft_type": "LORA",
                            "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}, tensors)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() * 2 for s in shapes.values())
    info = {
        "layers": layers, "parameters": params, "bytes": params * 2, "largest_tensor_bytes": largest,
        "shards": len(list(base.glob("*.safetensors"))), "adapter_r": r,
        "adapter_bytes": sum(t.numel() * 4 for t in tensors.values()),
    }
    return base, adapter, info


def check_same(a: Path, b: Path) -> float:
    """Max abs difference between two merged checkpoints (surgery vs peft), tensor by tensor."""
    from surgery.io.checkpoint import Checkpoint

    x, y = Checkpoint.open(a), Checkpoint.open(b)
    worst = 0.0
    for name in x.names():
        worst = max(worst, (x.get(name).float() - y.get(name).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=26, help="decoder layers (26 gives 1.06 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the fastest wall time is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="build inputs here and keep them")
    parser.add_argument("--note", default="", help="free text saved with the result (machine load, ...)")
    parser.add_argument("--machine", default=machine_name())
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.build_only is not None:  # child: build the inputs, print their description
        _, _, info = build_inputs(args.build_only, args.layers, args.seed)
        print(json.dumps(info))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="pipeline_merge-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        for stale in root.glob("out-*"):
            shutil.rmtree(stale)
        # with --keep DIR from an earlier run, its inputs are reused
        built = None if (root / "info.json").exists() else subprocess.run(
            [sys.executable, __file__, "--build-only", str(root), "--layers", str(args.layers),
             "--seed", str(args.seed)], check=True, capture_output=True, text=True,
        )
        if built is not None:
            (root / "info.json").write_text(built.stdout.strip().splitlines()[-1])
        info = json.loads((root / "info.json").read_text())
        base, adapter = root / "base", root / "adapter"
        print(f"built {info['bytes'] / 1e9:.2f} GB checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        exe = shutil.which("surgery")
        surgery = [exe] if exe else [sys.executable, "-m", "surgery.cli.main"]
        surgery += ["merge", str(base), str(adapter), "-o"]
        paths = {
            "surgery": lambda out: [*surgery, str(out)],
            "peft": lambda out: [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
            "floor": lambda out: [sys.executable, "-c", FLOOR_SCRIPT, str(base), str(out)],
        }
        runs: dict[str, list[dict]] = {k: [] for k in paths}
        warm(root)
        order = list(paths)
        for i in range(args.repeat):
            for name in order[i % 3:] + order[: i % 3]:  # rotate, so no path always runs first
                out = root / f"out-{name}-{i}"
                os.sync()  # every path starts without the previous one's dirty pages to write back
                time.sleep(2)  # and after the disk has settled (discards, journal): runs swung 2x without
                runs[name].append(measure_rss(paths[name](out), with_detail=False))
                print(name, runs[name][-1], flush=True)
                if not (i == args.repeat - 1 and name in ("surgery", "peft")):  # those two are compared
                    # deleted now, so the page cache does not fill up run after run (later runs then
                    # paid for reclaim: CPU time of the same merge rose 3x); the sync and pause above
                    # keep the file system's discards off the next run
                    shutil.rmtree(out)
        best = {
            name: {"wall_s": min(r["wall_s"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                   "cpu_s": min(r["cpu_s"] for r in rs), "runs": rs}
            for name, rs in runs.items()
        }
        last = args.repeat - 1
        diff = check_same(root / f"out-surgery-{last}", root / f"out-peft-{last}")
    finally:
        for stale in root.glob("out-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    s, p, f = best["surgery"], best["peft"], best["floor"]
    largest_mb = info["largest_tensor_bytes"] / 1e6 / 1.048576
    result = {
        "benchmark": "pipeline_merge",
        "machine": args.machine,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": args.note,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "checkpoint": info,
        "paths": best,
        "max_abs_diff_surgery_vs_peft": diff,
        "ratios": {
            "surgery_time_over_floor": round(s["wall_s"] / f["wall_s"], 2),
            "surgery_rss_over_peft": round(s["peak_rss_mb"] / p["peak_rss_mb"], 3),
            "peft_time_over_surgery": round(p["wall_s"] / s["wall_s"], 2),
        },
        "targets": {
            "rss_at_most_third_of_peft": s["peak_rss_mb"] <= p["peak_rss_mb"] / 3,
            "rss_at_most_largest_tensor_plus_400mb": s["peak_rss_mb"] <= largest_mb + 400,
            "time_within_1.5x_floor": s["wall_s"] <= 1.5 * f["wall_s"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pipeline_merge-{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| path | wall time (s) | CPU time (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|",
        f"| `surgery merge` | {s['wall_s']} | {s['cpu_s']} | {s['peak_rss_mb']} |",
        f"| transformers + peft (`from_pretrained`, `merge_and_unload`, `save_pretrained`) | {p['wall_s']} | "
        f"{p['cpu_s']} | {p['peak_rss_mb']} |",
        f"| floor: safetensors `load_file`/`save_file` per shard | {f['wall_s']} | {f['cpu_s']} | {f['peak_rss_mb']} |",
    ]
    md = [
        f"# pipeline_merge on {args.machine} ({result['cpu']}, {result['cpus']} CPUs), {result['date']}",
        "",
        f"Synthetic Llama-shaped bf16 checkpoint: {info['parameters'] / 1e9:.3f}B parameters, "
        f"{info['bytes'] / 1e9:.2f} GB in {info['shards']} shards, largest tensor {largest_mb:.0f} MiB; "
        f"LoRA r={info['adapter_r']} on all 7 projections of every layer (fp32 adapter). "
        f"Best of {args.repeat} runs per path (order rotated), each in its own subprocess, warm page cache, "
        "`sync` and a 2 s pause before each. "
        f"Load average at the end: {result['load_average_at_end']} on {result['cpus']} CPUs.",
        "",
        *rows,
        "",
        f"surgery / floor time: {result['ratios']['surgery_time_over_floor']}x (target <= 1.5x); "
        f"surgery / peft peak RSS: {result['ratios']['surgery_rss_over_peft']} (target <= 0.333); "
        f"largest tensor + 400 MB = {largest_mb + 400:.0f} MB. "
        f"Max |surgery - peft| over all tensors: {diff:g}.",
        "",
        f"Note: {args.note}" if args.note else "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md).rstrip() + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
