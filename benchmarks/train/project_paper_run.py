"""A projection (not a measurement) of the whole paper run's wall-clock on 1 x 8 and 4 x 8 H100.

The paper run: stage 1 (CoT-RAFT on the Feedback Collection), stage-2 CoT generation by the stage-1 model, stage 2,
and CoT-RAIL evaluation of both stages on the four benchmarks, with ``configs/paper-*.yaml`` (padded, as the
official code ran) and ``configs/paper-*-packed.yaml``. Every input is a named constant below with its source:
what this repository measured (the padding fractions of real and Feedback-Collection-like length distributions,
``benchmarks/train/bench_packing.py``; the packed/padded ratio its CPU run measured is reported beside, but CPU sdpa
is not the GPU kernel), published figures (each cited), and stated assumptions (each a low-high band). Nothing
here ran on a GPU; rerun with the GPU check's numbers when a device is lent.

    python benchmarks/train/project_paper_run.py --packing-json benchmarks/results/packing-cpu-2core.json \\
        --out benchmarks/results/projection-paper-run-h100
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense bf16); also tract_dist/train/stats.py
# Published training efficiency: torchtitan (pytorch/torchtitan docs/performance.md), Llama 3.1 8B, FSDP2 on 8 H100
# (NVLink; 96 GB HBM2e cards at a 500 W limit), bf16, local batch 2, selective activation checkpointing: 5,762
# tokens/s/GPU (6,667 with torch.compile), "33% to 39% MFU" (its words: "with or without torch.compile,
# respectively"). A DeepSpeed ZeRO-3 + transformers eager stack with LoRA, full recomputation and ~1.3K-token
# sequences runs smaller, less fused kernels: assumed 20-35 % MFU (the band's top is about torchtitan's).
MFU_BAND = (0.20, 0.35)
# Published packing gains (cross-check of the padding arithmetic, not used in it): Hugging Face blog "Improving
# Hugging Face Training Efficiency Through Packing with Flash Attention 2" (2024-08-21) and Kundu et al.,
# arXiv 2407.09105 (IBM): up to 2x throughput, up to 20 % less peak memory on FLAN-like length variance; ms-swift's
# padding-free example: 1.75x for a 7B ZeRO-3 run (both as the issue cites them).
PUBLISHED_PACKING_GAIN = (1.75, 2.0)
# Published generation throughput: MLPerf Inference v5.1, Llama-3.1-8B, Red Hat's vLLM 0.10.0 submission, FP8, one
# H100: 5,777 tokens/s offline (a summarisation task: long prompts, short outputs, as stage-2 generation is).
# The official TRACT inference generated its CoTs in FP8 too (FIDELITY.md); bf16 (this project's default) assumed
# at 0.45-0.8 of that rate.
VLLM_FP8_TOKENS_PER_S = 5777.0
BF16_VS_FP8 = (0.45, 0.8)
ENGINE_START_S = (60.0, 150.0)  # assumption: vLLM load + CUDA graphs of a 7-8B model from local disk, per start
EXPORT_S = (120.0, 300.0)  # assumption: ZeRO-3 consolidation + LoRA merge + safetensors of a 7-8B export, per stage
# Multi-node ZeRO-3 (4 x 8, 400 Gb/s InfiniBand per GPU): the base weights are all-gathered for every forward,
# recomputation and backward. Assumed scaling efficiency with the official per-device batch (compute per micro-
# batch ~2x the gathers, prefetch overlaps them) and with a global batch held at the 1 x 8 value (2 samples per GPU:
# gather-bound).
MULTI_NODE_EFF_PER_DEVICE_BATCH = (0.70, 0.95)
MULTI_NODE_EFF_FIXED_GLOBAL = (0.30, 0.55)

# The work (FIDELITY.md; the figures; configs/paper-*.yaml).
FC_EXAMPLES = 100_000  # Feedback Collection, ~100K records
FC_MEAN_TOKENS = 1300  # mean training sequence (prompt + CoT + score), the figure
CoT_TOKENS = (150, 300)  # generated CoT tokens per prompt (GPT-4 feedback runs ~100-250; cap 1,024): assumption
PROMPT_TOKENS = 1100  # FC prompt tokens (mean sequence minus a ~200-token CoT)
# Benchmark sizes: Vicuna Bench 320 responses (counted here, ../shared/data); Feedback Bench (OOD) 1,000, FLASK
# 2,000, MT Bench 320: the Prometheus 2 paper's counts, assumed (the files are not here).
BENCHMARK_JUDGEMENTS = 320 + 1000 + 2000 + 320


@dataclass(frozen=True)
class Family:
    name: str
    params: float  # total parameters
    epochs: int
    per_device_batch: int


FAMILIES = (Family("Mistral-7B-Instruct-v0.2", 7.24e9, 2, 8), Family("Llama-3.1-8B-Instruct", 8.03e9, 1, 4))


def fc_like_pad_fraction(micro: int, n: int = 200_000, seed: int = 0) -> float:
    """Padding of micro-batches of ``micro`` sequences drawn from bench_packing.py's Feedback-Collection-like
    length model (lognormal, median 1,200, sigma 0.45, clipped to [300, 3,000])."""
    rnd = random.Random(seed)
    lengths = [int(min(3000, max(300, rnd.lognormvariate(math.log(1200), 0.45)))) for _ in range(n)]
    useful = slots = 0
    for i in range(0, n - micro + 1, micro):
        batch = lengths[i:i + micro]
        useful += sum(batch)
        slots += micro * max(batch)
    return 1 - useful / slots


def training_hours(f: Family, gpus: int, packed: bool, efficiency: tuple[float, float]) -> tuple[float, float]:
    """One training stage: LoRA with full recomputation costs ~6N FLOPs per computed token (forward 2N, recompute
    2N, activation gradients 2N; frozen weights get none); padded batches compute the pad slots too."""
    real = FC_EXAMPLES * f.epochs * FC_MEAN_TOKENS
    computed = real if packed else real / (1 - fc_like_pad_fraction(f.per_device_batch))
    flops = 6 * f.params * computed
    lo = flops / (gpus * H100_BF16_DENSE * MFU_BAND[1] * efficiency[1]) / 3600
    hi = flops / (gpus * H100_BF16_DENSE * MFU_BAND[0] * efficiency[0]) / 3600
    return lo, hi


def generation_hours(n_prompts: int, cots: int, gpus: int, starts: int) -> tuple[float, float]:
    """CoTs from data-parallel vLLM replicas (one per GPU): output tokens / per-GPU rate, plus engine starts."""
    out_lo, out_hi = n_prompts * cots * CoT_TOKENS[0], n_prompts * cots * CoT_TOKENS[1]
    rate_lo, rate_hi = VLLM_FP8_TOKENS_PER_S * BF16_VS_FP8[0], VLLM_FP8_TOKENS_PER_S * BF16_VS_FP8[1]
    lo = out_lo / (gpus * rate_hi) + starts * ENGINE_START_S[0]
    hi = out_hi / (gpus * rate_lo) + starts * ENGINE_START_S[1]
    return lo / 3600, hi / 3600


def project(packing: dict | None) -> dict:
    rows = []
    for f in FAMILIES:
        cases = [(8, "1 x 8 H100", False, (1.0, 1.0), f"padded, global {8 * f.per_device_batch}"),
                 (8, "1 x 8 H100", True, (1.0, 1.0), f"packed, global {8 * f.per_device_batch}"),
                 (32, "4 x 8 H100", False, MULTI_NODE_EFF_PER_DEVICE_BATCH,
                  f"padded, global {32 * f.per_device_batch} (per-device {f.per_device_batch}: 1/4 of the steps)"),
                 (32, "4 x 8 H100", True, MULTI_NODE_EFF_PER_DEVICE_BATCH,
                  f"packed, global {32 * f.per_device_batch} (per-device {f.per_device_batch}: 1/4 of the steps)"),
                 (32, "4 x 8 H100", True, MULTI_NODE_EFF_FIXED_GLOBAL,
                  f"packed, global {8 * f.per_device_batch} kept (the -packed config: gather-bound ZeRO-3)")]
        for gpus, label, packed, eff, layout in cases:
            stage = training_hours(f, gpus, packed, eff)
            gen = generation_hours(FC_EXAMPLES, 1, gpus, starts=1)
            # 2 stages x 4 benchmarks, one engine start each; a sampled CoT + one read-out per judgement
            ev = generation_hours(2 * BENCHMARK_JUDGEMENTS, 1, gpus, starts=8)
            exports = (2 * EXPORT_S[0] / 3600, 2 * EXPORT_S[1] / 3600)
            total = tuple(2 * stage[i] + gen[i] + ev[i] + exports[i] for i in (0, 1))
            rows.append({"model": f.name, "cluster": label, "layout": layout,
                         "stage_h": stage, "generation_h": gen, "evaluation_h": ev, "exports_h": exports,
                         "total_h": total})
    return {"rows": rows, "pad_fraction_fc_like": {m: fc_like_pad_fraction(m) for m in (2, 4, 8)},
            "measured_cpu": packing}


def fmt(r: tuple[float, float]) -> str:
    return f"{r[0]:.2f}-{r[1]:.2f}" if r[1] < 1 else f"{r[0]:.1f}-{r[1]:.1f}"


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model | cluster | layout | one training stage, h | stage-2 generation, h | evaluation (2 stages x 4), h "
             "| exports, h | whole run, h |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['cluster']} | {r['layout']} | {fmt(r['stage_h'])} | "
                     f"{fmt(r['generation_h'])} | {fmt(r['evaluation_h'])} | {fmt(r['exports_h'])} | "
                     f"{fmt(r['total_h'])} |")
    pads = ", ".join(f"{m}: {p:.2f}" for m, p in report["pad_fraction_fc_like"].items())
    text = "\n".join(lines) + f"\n\nPadding of Feedback-Collection-like micro-batches by size (the length model): {pads}\n"
    measured = report.get("measured_cpu")
    if measured:
        cells = "; ".join(f"{k}: pad {v['pad_fraction']:.2f}" + (
            f", {v['cpu_speedup_vs_padded']:.2f}x per CPU-second (padding bound {v['padding_bound_vs_padded']:.2f}x)"
            if v.get("cpu_speedup_vs_padded") is not None else "") for k, v in measured["rows"].items())
        text += f"\nMeasured on {measured['machine']} ({measured['source']}): {cells}\n"
    out.with_suffix(".table.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packing-json", default=None, help="bench_packing.py's JSON (the measured CPU figures)")
    ap.add_argument("--out", default=None, help="output stem: .json and .table.md")
    args = ap.parse_args(argv)
    packing = None
    if args.packing_json:
        rep = json.loads(Path(args.packing_json).read_text())
        # the per-CPU-second ratio: on a shared CPU machine the wall-clock one carries the other processes' load
        keys = ("pad_fraction", "cpu_speedup_vs_padded", "padding_bound_vs_padded", "useful_tokens_per_cpu_s")
        packing = {"source": args.packing_json, "machine": rep["machine"]["name"],
                   "rows": {f"{r['distribution']}/{r['variant']}": {k: r.get(k) for k in keys} for r in rep["rows"]}}
    report = project(packing)
    for r in report["rows"]:
        print(r["model"], r["cluster"], r["layout"], "total h", fmt(r["total_h"]))
    if args.out:
        write(report, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
