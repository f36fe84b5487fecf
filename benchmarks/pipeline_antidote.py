"""Pipeline benchmark: `surgery antidote` on a merged model, against the load-whole-model path and the I/O floor.

Builds (in a temporary directory, seeded) a synthetic Llama-shaped bf16 checkpoint
(default about 1B parameters; `--params` scales the layer count), then runs, each in its
own subprocess so that peak RSS is that path's alone:

- surgery: `surgery.methods.antidote.antidote` merged mode, exactly as `surgery antidote`
  runs it (every decoder Linear, ratio 0.1, per row): layer-by-layer calibration from the
  checkpoint, the fused edit (`wanda_prune_`: score, select and zero per row block, plus the
  report's nonzero counts), the output streamed. Run `--repeat` times, each run paired with
  a floor run just before it; the headline is the median over the pairs of
  (edit + I/O) / floor. I/O is checkpoint reads plus writes.
- surgery, split edit: the same pipeline once more with the edit split into scoring
  (`wanda_score`) and masking (`topk_mask` with Antidote's count, then the zeroing), to
  show where the edit's time goes. On a CPU both take the sort-free `select_cpu` path
  (same mask as the sort).
- reference: the load-the-whole-model path the published code takes:
  `from_pretrained` in fp32, capture layer 0's inputs, then per layer: hooks, forward,
  `torch.sort(stable=True)` per row, zero, re-run, and `save_pretrained` in bf16.
- floor: `safetensors` `load_file`/`save_file` per shard (read and write once).

Calibration is the same for both: `--samples` random token sequences of `--seq-len`
tokens (seeded), whole sequences counted, batch 1. The two outputs are compared tensor
by tensor. Wall time is measured around each subprocess (imports included); peak RSS
comes from `wait4`. Results: `benchmarks/results/pipeline_antidote-<machine>.json` and `.md`.

    python benchmarks/pipeline_antidote.py [--params 1.0e9] [--samples 8] [--seq-len 128] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import FLOOR_SCRIPT, cpu_model, machine_name, measure_rss, warm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = 0.1
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000  # TinyLlama-1.1B shapes


def layer_params() -> int:
    head = HIDDEN // HEADS
    return 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN


def layers_for(params: float) -> int:
    return max(1, round((params - 2 * VOCAB * HIDDEN - HIDDEN) / layer_params()))


def samples_for(vocab: int, n: int, seq_len: int, seed: int):
    """Seeded random token sequences (the same in every child)."""
    import torch

    from surgery.calib.data import Sample

    gen = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(3, vocab, (seq_len,), generator=gen), torch.ones(seq_len, dtype=torch.bool))
            for _ in range(n)]


def settle() -> None:
    """Start each path with no other path's dirty pages to write back: on this VM a 2 GB write
    took 0.7 s with the page cache clean and 6.7 s right after another 2 GB write."""
    os.sync()
    time.sleep(2)


def build(root: Path, layers: int, seed: int) -> dict:
    """A Llama-shaped bf16 checkpoint streamed to disk, sharded at 1 GB."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from surgery.io.writer import CheckpointWriter, TensorSpec

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    config_dir = root / "config"
    config.save_pretrained(config_dir)
    gen = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    with CheckpointWriter(root / "base", specs, shard_size=1_000_000_000,
                          copy_files_from=[config_dir / "config.json"]) as w:
        for spec in specs:
            if len(spec.shape) == 1:
                w.write(spec.name, (1 + 0.1 * torch.randn(spec.shape, generator=gen)).to(torch.bfloat16))
            else:
                w.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16))
    params = sum(torch.Size(s).numel() for s in shapes.values())
    return {"layers": layers, "parameters": params, "bytes": params * 2,
            "decoder_layer_params": layer_params(), "shards": len(list((root / "base").glob("*.safetensors")))}


def run_product(base: Path, out: Path, n: int, seq_len: int, seed: int) -> dict:
    """`surgery antidote` merged mode as shipped: the fused edit, the report's own time split."""
    import torch

    from surgery.methods.antidote import antidote

    samples = samples_for(VOCAB, n, seq_len, seed)
    torch.set_num_threads(os.cpu_count() or 1)
    report = antidote(base, None, RATIO, out, scope="row", samples=samples)
    return {**report.seconds, "changed": report.changed, "tensors": len(report.tensors)}


def run_split(base: Path, out: Path, n: int, seq_len: int, seed: int) -> dict:
    """The streamed Antidote (merged mode) with its edit timed as scoring and masking."""
    import torch
    from surgery.kernels import topk_mask
    from surgery.kernels.wanda_score import wanda_score

    from surgery.methods.antidote import antidote_count
    from surgery.model.load import default_device
    from surgery.pipeline.layerwise import layer_surgery
    from surgery.pipeline.layerwise import sync_device as _sync
    from surgery.report import Report, TensorChange

    split = {"scoring": 0.0, "masking": 0.0, "scoring_cpu": 0.0, "masking_cpu": 0.0}

    def edit(name, W, st):
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        score = wanda_score(W, st.sq_norms.to(W.device))
        _sync()
        t1, c1 = time.perf_counter(), time.process_time()
        k = antidote_count(W.shape[1], RATIO)
        mask = topk_mask(score, RATIO, largest=True, scope="row", k=k)
        del score
        before = int(torch.count_nonzero(W))
        W.masked_fill_(mask, 0)
        _sync()
        split["scoring"] += t1 - t0
        split["masking"] += time.perf_counter() - t1
        split["scoring_cpu"] += c1 - c0
        split["masking_cpu"] += time.process_time() - c1
        return TensorChange(name, list(W.shape), k * W.shape[0], before - int(torch.count_nonzero(W)))

    samples = samples_for(VOCAB, n, seq_len, seed)
    torch.set_num_threads(os.cpu_count() or 1)
    report = layer_surgery(base, samples, edit, out,
                           Report("antidote-merged", {"ratio": RATIO, "scope": "row", "benchmark": True}),
                           device=default_device())
    return {**report.seconds, **split, "changed": report.changed, "tensors": len(report.tensors)}


REFERENCE_SCRIPT = """
import sys, json, time, torch
sys.path.insert(0, sys.argv[5])
from pipeline_antidote import samples_for, VOCAB, RATIO
from transformers import AutoModelForCausalLM
base, out, n, seq_len, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
t = {"load": 0.0, "calibration": 0.0, "scoring": 0.0, "masking": 0.0, "save": 0.0}
c = dict(t)
t0, c0 = time.perf_counter(), time.process_time()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)   # as the reference: fp32, whole model
model.eval()
t["load"], c["load"] = time.perf_counter() - t0, time.process_time() - c0
samples = samples_for(VOCAB, n, seq_len, seed)
layers = model.model.layers
cache, kw = [], []
class Stop(Exception): pass
def catch(mod, args, kwargs):
    cache.append(args[0] if args else kwargs["hidden_states"])
    kw.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
    raise Stop
t0, c0 = time.perf_counter(), time.process_time()
h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
with torch.no_grad():
    for s in samples:
        try:
            model(s.input_ids[None], use_cache=False)
        except Stop:
            pass
h.remove()
t["calibration"] += time.perf_counter() - t0
c["calibration"] += time.process_time() - c0
for layer in layers:
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    sq = {n: torch.zeros(m.in_features) for n, m in lins.items()}
    def hook(name):
        def fn(mod, inp, o):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[name] += (x * x).sum(0)
        return fn
    hs = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(len(cache)):
            layer(cache[i], **kw[i])
    t["calibration"] += time.perf_counter() - t0
    c["calibration"] += time.process_time() - c0
    for x in hs:
        x.remove()
    for n, m in lins.items():
        W = m.weight.data
        t0, c0 = time.perf_counter(), time.process_time()
        metric = W.abs() * torch.sqrt(sq[n]).reshape(1, -1)
        t1, c1 = time.perf_counter(), time.process_time()
        mask = torch.ones_like(W, dtype=torch.bool)
        idx = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, idx[:, : int(W.shape[1] * (1 - RATIO))], False)
        W[mask] = 0
        t["scoring"] += t1 - t0
        t["masking"] += time.perf_counter() - t1
        c["scoring"] += c1 - c0
        c["masking"] += time.process_time() - c1
        del metric, idx, mask
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(len(cache)):
            cache[i] = layer(cache[i], **kw[i])
    t["calibration"] += time.perf_counter() - t0
    c["calibration"] += time.process_time() - c0
t0, c0 = time.perf_counter(), time.process_time()
model.to(torch.bfloat16).save_pretrained(out)
t["save"], c["save"] = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({**t, **{k + "_cpu": v for k, v in c.items()}}))
"""

def compare(a: Path, b: Path) -> dict:
    """Entries that differ between the two outputs, and the share of zeros in the surgery output's Linears."""
    import torch

    from surgery.io.checkpoint import Checkpoint

    x, y = Checkpoint.open(a), Checkpoint.open(b)
    differ = total = 0
    for name in x.names():
        u, v = x.get(name), y.get(name)
        differ += int((u != v).sum())
        total += u.numel()
    return {"differing_entries": differ, "entries": total, "dtype": str(torch.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1.0e9, help="approximate parameter count (sets the layers)")
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="skip the load-whole-model path")
    parser.add_argument("--repeat", type=int, default=3, help="floor + surgery pairs (the headline is their median)")
    parser.add_argument("--keep", type=Path, default=None, help="build inputs here and keep them")
    parser.add_argument("--note", default="", help="free text saved with the result (machine load, ...)")
    parser.add_argument("--machine", default=machine_name())
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # child modes: build | imports | calibrate | surgery
        if args.child[0] == "build":
            print(json.dumps(build(Path(args.child[1]), int(args.child[2]), args.seed)))
        elif args.child[0] == "imports":  # the runtime alone: code loaded, a weightless model built, no tensor read
            import transformers

            import surgery.methods.antidote  # noqa: F401
            from surgery.calib.layerwise import _params_on_meta

            config = transformers.AutoConfig.from_pretrained(args.child[1])
            with _params_on_meta():
                transformers.AutoModel.from_config(config)
            print("{}")
        elif args.child[0] == "calibrate":  # layer-by-layer statistics only (no edit, no output)
            from surgery.calib.layerwise import calibrate_layerwise

            timings: dict[str, float] = {}
            calibrate_layerwise(Path(args.child[1]), samples_for(VOCAB, args.samples, args.seq_len, args.seed),
                                keep_stats=False, timings=timings)
            print(json.dumps(timings))
        else:  # product | split
            run = run_product if args.child[0] == "product" else run_split
            print(json.dumps(run(Path(args.child[1]), Path(args.child[2]), args.samples, args.seq_len, args.seed)))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="pipeline_antidote-"))
    root.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    try:
        for stale in root.glob("out-*"):
            shutil.rmtree(stale)
        layers = layers_for(args.params)
        if not (root / "info.json").exists() or json.loads((root / "info.json").read_text())["layers"] != layers:
            shutil.rmtree(root / "base", ignore_errors=True)
            t0 = time.perf_counter()
            built = measure_rss([sys.executable, __file__, "--seed", str(args.seed), "--child", "build", str(root),
                                 str(layers)])
            (root / "info.json").write_text(json.dumps(built["detail"]))
            print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        info = json.loads((root / "info.json").read_text())
        base = root / "base"
        common = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
        warm(base)
        paths: dict[str, dict] = {}
        rounds: list[dict] = []
        for _ in range(args.repeat):  # floor then product, each pair close in time on a noisy machine
            shutil.rmtree(root / "out-surgery", ignore_errors=True)
            settle()
            floor = measure_rss([sys.executable, "-c", FLOOR_SCRIPT, str(base), str(root / "out-floor")])
            shutil.rmtree(root / "out-floor")
            print("floor", floor, flush=True)
            settle()
            product = measure_rss([sys.executable, __file__, *common, "--child", "product", str(base),
                                   str(root / "out-surgery")])
            print("surgery", product, flush=True)
            rounds.append({"floor": floor, "surgery": product})
        settle()
        paths["surgery_split"] = measure_rss([sys.executable, __file__, *common, "--child", "split", str(base),
                                              str(root / "out-split")])
        shutil.rmtree(root / "out-split")
        print("surgery split", paths["surgery_split"], flush=True)
        settle()
        paths["imports"] = measure_rss([sys.executable, __file__, "--child", "imports", str(base)])
        print("imports", paths["imports"], flush=True)
        settle()
        paths["calibrate"] = measure_rss([sys.executable, __file__, *common, "--child", "calibrate", str(base)])
        print("calibrate", paths["calibrate"], flush=True)
        if not args.skip_reference:
            settle()
            paths["reference"] = measure_rss([sys.executable, "-c", REFERENCE_SCRIPT, str(base), str(root / "out-ref"),
                                              str(args.samples), str(args.seq_len), here, str(args.seed)])
            print("reference", paths["reference"], flush=True)
            same = compare(root / "out-surgery", root / "out-ref")
        else:
            same = None
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    # The median pair (by wall ratio) stands for the product and the floor in the table.
    def ratio(r: dict, kind: str) -> float:
        d, f = r["surgery"]["detail"], r["floor"]
        if kind == "wall":
            return (d["edit"] + d["io"]) / f["wall_s"]
        return (d["edit_cpu"] + d["io_cpu"]) / f["cpu_s"]

    walls = sorted(ratio(r, "wall") for r in rounds)
    cpus = sorted(ratio(r, "cpu") for r in rounds)
    med_wall, med_cpu = statistics.median(walls), statistics.median(cpus)
    mid = sorted(rounds, key=lambda r: ratio(r, "wall"))[(len(rounds) - 1) // 2]
    s, f = mid["surgery"], mid["floor"]
    paths["surgery"], paths["floor"] = s, f
    d = s["detail"]
    sp = paths["surgery_split"]["detail"]
    layer_mb_fp32 = info["decoder_layer_params"] * 4 / 2**20
    cache_mb = args.samples * args.seq_len * HIDDEN * 4 / 2**20
    embed_mb = VOCAB * HIDDEN * 4 / 2**20
    runtime_mb = paths["imports"]["peak_rss_mb"]
    calib_mb = paths["calibrate"]["peak_rss_mb"] - runtime_mb
    calib_budget_mb = 2 * layer_mb_fp32 + cache_mb
    result = {
        "benchmark": "pipeline_antidote", "machine": args.machine, "cpu": cpu_model(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": __import__("torch").__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": args.note,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "checkpoint": info, "calibration": {"samples": args.samples, "seq_len": args.seq_len, "ratio": RATIO},
        "paths": paths, "rounds": rounds, "outputs_compared": same,
        "memory_model_mb": {"decoder_layer_fp32": round(layer_mb_fp32, 1), "activation_cache": round(cache_mb, 1),
                            "embedding_fp32": round(embed_mb, 1), "runtime_after_imports": runtime_mb,
                            "calibration_peak_above_runtime": round(calib_mb, 1),
                            "two_layers_plus_cache": round(calib_budget_mb, 1)},
        "targets": {"calibration_peak_within_two_layers_plus_cache": calib_mb <= calib_budget_mb,
                    "masking_plus_io_within_1.5x_floor_wall": med_wall <= 1.5,
                    "masking_plus_io_within_1.5x_floor_cpu": med_cpu <= 1.5},
        "ratios": {
            "surgery_masking_plus_io_over_floor": round(med_wall, 2),
            "surgery_masking_plus_io_over_floor_cpu": round(med_cpu, 2),
            "surgery_masking_plus_io_over_floor_each_round": [round(x, 2) for x in walls],
            "surgery_masking_plus_io_over_floor_cpu_each_round": [round(x, 2) for x in cpus],
            "surgery_wall_over_floor": round(s["wall_s"] / f["wall_s"], 2),
            **({"surgery_rss_over_reference": round(s["peak_rss_mb"] / paths["reference"]["peak_rss_mb"], 3),
                "reference_wall_over_surgery": round(paths["reference"]["wall_s"] / s["wall_s"], 2)}
               if "reference" in paths else {}),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pipeline_antidote-{args.machine}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    def cell(wall: float, cpu: float) -> str:
        return f"{wall:.1f} / {cpu:.1f}"

    p = paths["surgery_split"]
    rows = ["| path | total wall / CPU (s) | peak RSS (MB) | setup | calibration | scoring | masking | I/O |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| surgery antidote (layer by layer, streamed; fused edit, median round) | "
            f"{cell(s['wall_s'], s['cpu_s'])} | {s['peak_rss_mb']} | {cell(d['setup'], d['setup_cpu'])} | "
            f"{cell(d['calibration'], d['calibration_cpu'])} | (in masking) | "
            f"{cell(d['edit'], d['edit_cpu'])} | {cell(d['io'], d['io_cpu'])} |",
            f"| surgery, edit split into score / select + zero | {cell(p['wall_s'], p['cpu_s'])} | "
            f"{p['peak_rss_mb']} | {cell(sp['setup'], sp['setup_cpu'])} | "
            f"{cell(sp['calibration'], sp['calibration_cpu'])} | {cell(sp['scoring'], sp['scoring_cpu'])} | "
            f"{cell(sp['masking'], sp['masking_cpu'])} | {cell(sp['io'], sp['io_cpu'])} |"]
    if "reference" in paths:
        r = paths["reference"]
        rd = r["detail"]
        rows.append(f"| reference path (fp32 whole model, torch.sort, save_pretrained) | {cell(r['wall_s'], r['cpu_s'])} | "
                    f"{r['peak_rss_mb']} | | {cell(rd['calibration'], rd['calibration_cpu'])} | "
                    f"{cell(rd['scoring'], rd['scoring_cpu'])} | {cell(rd['masking'], rd['masking_cpu'])} | "
                    f"{cell(rd['load'] + rd['save'], rd['load_cpu'] + rd['save_cpu'])} |")
    rows.append(f"| floor: safetensors load_file/save_file per shard (median round) | {cell(f['wall_s'], f['cpu_s'])} | "
                f"{f['peak_rss_mb']} | | | | | {cell(f['wall_s'], f['cpu_s'])} |")
    c = paths["calibrate"]
    rows.append(f"| surgery layer-by-layer calibration alone (statistics, no edit) | {cell(c['wall_s'], c['cpu_s'])} | "
                f"{c['peak_rss_mb']} | {cell(c['detail'].get('setup', 0), c['detail'].get('setup_cpu', 0))} | "
                f"{cell(c['detail'].get('forward', 0), c['detail'].get('forward_cpu', 0))} | | | "
                f"{cell(c['detail'].get('read', 0), c['detail'].get('read_cpu', 0))} |")
    rows.append(f"| runtime only (imports, a weightless model built from config.json) | "
                f"{cell(paths['imports']['wall_s'], paths['imports']['cpu_s'])} | {runtime_mb} | | | | | |")
    pairs = "; ".join(f"{r['surgery']['detail']['edit'] + r['surgery']['detail']['io']:.1f} s vs "
                      f"{r['floor']['wall_s']:.1f} s" for r in rounds)
    md = [
        f"# pipeline_antidote on {args.machine} ({result['cpu']}, {result['cpus']} CPUs), {result['date']}",
        "",
        f"Synthetic Llama-shaped bf16 checkpoint (TinyLlama shapes, random weights): {info['parameters'] / 1e9:.3f}B "
        f"parameters, {info['layers']} decoder layers, {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards. "
        f"Antidote merged mode, ratio {RATIO} per row on all 7 Linears of every layer; calibration {args.samples} x "
        f"{args.seq_len} random tokens, batch 1, whole sequence. Each path in its own subprocess (imports included), "
        f"warm page cache; the product and the floor run {args.repeat} times in pairs, the other paths once. "
        f"Load average at the end: {result['load_average_at_end']}.",
        "",
        *rows,
        "",
        "Cells are wall / process-CPU seconds (the machine is shared: CPU seconds are the steadier measure). "
        "Setup: transformers' model code imported and a weightless skeleton built (startup, not I/O; the floor's "
        "own interpreter start and imports are inside its wall time). The product's edit is fused (score, select "
        "and zero per row block, and the report's nonzero counts), so its masking column includes scoring.",
        "",
        f"Surgery edit + I/O over the floor, median of {len(rounds)} pairs: {med_wall:.2f}x wall, {med_cpu:.2f}x CPU "
        f"(target <= 1.5x); each pair (edit + I/O vs floor, wall): {pairs}.",
        f"Memory model: one decoder layer in fp32 {layer_mb_fp32:.0f} MB, activation cache {cache_mb:.0f} MB. "
        f"Layer-by-layer calibration peak above the runtime: {calib_mb:.0f} MB "
        f"(target <= 2 layers + cache = {calib_budget_mb:.0f} MB).",
        (f"Surgery / reference peak RSS: {result['ratios']['surgery_rss_over_reference']}; outputs (the product's, "
         f"last round) differ in {same['differing_entries']} of {same['entries']:,} entries." if same else ""),
        "",
        f"Note: {args.note}" if args.note else "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md).rstrip() + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
