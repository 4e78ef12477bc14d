"""sdpa against the CPU decode dispatch (``tract_dist.models.cpu_attention``), side by side in one process.

    python benchmarks/runtime/bench_cpu_attention.py     # one thread, as each quickstart replica has

Two levels, the implementations alternating, each timing the best of ``--repeats`` after a warm-up:
- one attention call of a decode step (a single query row) at SmolLM2-135M's heads (9 query, 3 key/value heads,
  dim 64), 4 sequences, 500 / 1,000 / 2,000 cached keys, bf16 and fp32, with the max |difference| of each
  output from a float64 reference;
- what a judge replica does in the quickstart: SmolLM2 in bf16 generating 40 tokens for a batch of 4 left-padded
  ~700-token prompts (one replica's batch), then the same with fp32 weights.
Peak memory is the process's largest resident set (both models are held at once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "pipeline"))
from bench_dtype import best  # noqa: E402 - the same best-of-repeats timer as the dtype benchmark


class _Heads(torch.nn.Module):
    num_key_value_groups = 3


def op_rows(repeats: int) -> list[dict[str, Any]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tract_dist.models.cpu_attention import sdpa_cpu_decode_forward

    mod, rows = _Heads().eval(), []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for keys in (500, 1000, 2000):
            q = torch.randn(4, 9, 1, 64, generator=g, dtype=torch.float64)
            k = torch.randn(4, 3, keys, 64, generator=g, dtype=torch.float64)
            v = torch.randn(4, 3, keys, 64, generator=g, dtype=torch.float64)
            mask = torch.ones(4, 1, 1, keys, dtype=torch.bool)
            mask[1:, :, :, : keys // 3] = False  # left padding in three of the four rows
            ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)
            args = (q.to(dtype), k.to(dtype), v.to(dtype), mask)
            row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "keys": keys}
            for name, fn in (("sdpa", sdpa_attention_forward), ("dispatch", sdpa_cpu_decode_forward)):
                row[f"{name}_ms"] = round(best(lambda: fn(mod, *args, scaling=0.125), repeats * 10) * 1e3, 3)
                row[f"{name}_err"] = float((fn(mod, *args, scaling=0.125)[0].double() - ref).abs().max())
            row["speedup"] = round(row["sdpa_ms"] / row["dispatch_ms"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def generate_rows(repeats: int) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    from tract_dist.models import cpu_attention
    from tract_dist.models.loading import materialize_alias

    cpu_attention.register()
    path = materialize_alias("smollm2")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49000, (4, 700), generator=g)
    mask = torch.ones_like(ids)
    for i, pad in enumerate((0, 60, 150, 240)):  # left padding, as a batch of prompts of unequal length has
        ids[i, :pad], mask[i, :pad] = 0, 0
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
        row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "work": "generate 4 x 40 after 4 x 700"}
        outs = {}
        for impl in ("sdpa", cpu_attention.NAME):
            model.set_attn_implementation(impl)

            def run() -> Any:
                with torch.no_grad():
                    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                                          do_sample=False, pad_token_id=0)

            key = "sdpa" if impl == "sdpa" else "dispatch"
            row[f"{key}_s"] = round(best(run, repeats), 3)
            outs[key] = run()
        row["speedup"] = round(row["sdpa_s"] / row["dispatch_s"], 2)
        row["same_tokens"] = bool(torch.equal(outs["sdpa"], outs["dispatch"]))
        rows.append(row)
        print(row, flush=True)
        del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu-attention-cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ops, gens = op_rows(args.repeats), generate_rows(args.repeats)
    report = {"machine": "cpu-2core", "threads": args.threads, "torch": torch.__version__,
              "load_before": load_before, "load_after": os.getloadavg(), "ops": ops, "generate": gens,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    lines = [f"# sdpa vs the CPU decode dispatch — cpu-2core, {args.threads} thread(s)", "",
             f"`benchmarks/runtime/bench_cpu_attention.py`; torch {report['torch']}; load "
             f"{tuple(round(x, 1) for x in load_before)} -> {tuple(round(x, 1) for x in report['load_after'])}; "
             f"peak memory {report['peak_rss_gb']} GB. Best of the repeats.", "",
             "One decode-step attention call (4 sequences, 9 query / 3 kv heads, dim 64; max |error| against "
             "float64):", "", "| dtype | keys | sdpa ms | dispatch ms | speed-up | sdpa err | dispatch err |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['keys']} | {r['sdpa_ms']} | {r['dispatch_ms']} | {r['speedup']}x | "
              f"{r['sdpa_err']:.1e} | {r['dispatch_err']:.1e} |" for r in ops]
    lines += ["", "SmolLM2-135M generating 40 tokens for 4 left-padded 700-token prompts (a quickstart replica's "
              "batch):", "", "| dtype | sdpa s | dispatch s | speed-up | same tokens |", "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['sdpa_s']} | {r['dispatch_s']} | {r['speedup']}x | {r['same_tokens']} |"
              for r in gens]
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
