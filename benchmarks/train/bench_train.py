"""Training throughput: the fused CoT-RAFT loss vs the materialised (reference) loss, in one run.

Both variants run the real training worker (DeepSpeed ZeRO-3, the same data and steps); the only change is
``loss.impl``. Reports tokens/s per worker (median over steps after the first), MFU and peak GPU memory on
CUDA, peak RSS per process on CPU, and the ratios fused / reference.

CPU (this repo's CI kind of machine):
    python benchmarks/train/bench_train.py --preset cpu-tiny
GPU (one card, no Ray needed; random-initialised ~1B Llama-3-shaped model, vocab 128256, sequences ~2048):
    python benchmarks/train/bench_train.py --preset gpu-1b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PRESETS = {
    "cpu-tiny": dict(model="tiny-llama", tokenizer="smollm2", workers=2, launcher="torchrun", gpu=False,
                     max_length=1024, examples=32, steps=6, micro=1, accum=2),
    "gpu-1b": dict(model="random-llama-1b", tokenizer="llama3", workers=1, launcher="torchrun", gpu=True,
                   max_length=2048, examples=64, steps=12, micro=2, accum=1),
}


def machine_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def run_variant(impl: str, p: dict, data: str, work: Path) -> dict:
    from tract_dist.config import load_config
    from tract_dist.train.trainer import run_training

    base = {
        "model": {"name_or_path": p["model"], "tokenizer": p["tokenizer"], "gradient_checkpointing": p["gpu"]},
        "data": {"train_path": data, "train_format": "prometheus-eval", "max_length": p["max_length"],
                 "max_examples": p["examples"]},
        "loss": {"impl": impl},
        "training": {"output_dir": str(work), "max_steps": p["steps"], "micro_batch_size": p["micro"],
                     "gradient_accumulation_steps": p["accum"], "save_steps": 10**6, "learning_rate": 1e-5},
        "tracking": {"enabled": False},
        "cluster": {"num_workers": p["workers"], "use_gpu": p["gpu"]},
    }
    cfg = load_config(None, base=base)
    t0 = time.perf_counter()
    result = run_training(cfg, run_name=f"bench-{impl}", launcher=p["launcher"])
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    later = steps[1:] or steps
    out = {"impl": impl, "wall_s": wall, "steps": len(steps),
           "tokens_per_s_per_worker": statistics.median(s["tokens_per_s_per_worker"] for s in later),
           "final_loss": steps[-1]["loss"]}
    for key in ("mfu", "peak_memory_gb"):
        if key in steps[-1]:
            out[key] = max(s[key] for s in steps) if key == "peak_memory_gb" else statistics.median(s[key] for s in later)
    info = json.loads((result.run_dir / "train_result.json").read_text())
    out["peak_rss_gb"] = info.get("peak_rss_gb")
    return out


def main() -> None:
    from tract_dist import console

    console.attach()  # an entry point: the library's console lines (logged) on this terminal
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--data", default=os.environ.get("TRACT_SHARED_DATA", str(REPO.parent / "shared" / "data"))
                    + "/prometheus-eval/vicuna_eval.json")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--out", help="JSON output (default benchmarks/results/train-<machine>.json)")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for impl in ("reference", "fused"):
            rows.append(run_variant(impl, p, args.data, Path(d)))
    ref, fused = rows
    report = {
        "machine": machine_name(p["gpu"]), "platform": platform.platform(), "preset": args.preset, "settings": p,
        "results": rows,
        "ratio_tokens_per_s_fused_over_reference": fused["tokens_per_s_per_worker"] / ref["tokens_per_s_per_worker"],
    }
    if ref.get("peak_memory_gb"):
        report["ratio_peak_memory_fused_over_reference"] = fused["peak_memory_gb"] / ref["peak_memory_gb"]
    if ref.get("peak_rss_gb"):
        report["ratio_peak_rss_fused_over_reference"] = fused["peak_rss_gb"] / ref["peak_rss_gb"]
    out = Path(args.out or REPO / "benchmarks" / "results" / f"train-{report['machine']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'impl':<10} {'tok/s/worker':>13} {'MFU':>6} {'peak GB':>8} {'RSS GB':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['impl']:<10} {r['tokens_per_s_per_worker']:>13.1f} {r.get('mfu', float('nan')):>6.3f} "
              f"{r.get('peak_memory_gb') or float('nan'):>8.2f} {r.get('peak_rss_gb') or float('nan'):>7.2f} "
              f"{r['wall_s']:>7.1f}")
    print(f"fused / reference tokens/s: {report['ratio_tokens_per_s_fused_over_reference']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
