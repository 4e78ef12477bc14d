"""The HF engine's per-row CPU prefill (``HFEngine._prefill_rows``) against ``generate``'s padded batch prefill,
side by side in one process, through the engine itself.

    python benchmarks/runtime/bench_row_prefill.py     # one thread, as each quickstart replica has

What a quickstart replica does: the real SmolLM2-135M-Instruct (the ``smollm2`` alias) writes a CoT of up to 40
tokens for 4 prompts of unequal length (900-1,050 tokens, the lengths of the quickstart's Vicuna Bench prompts),
then reads out RAIL after each CoT from the kept prompt cache. Per dtype, the two prefills alternate (best of
``--repeats`` after a warm-up): ``padded`` is the engine with ``_prefill_rows`` switched off (transformers'
own batched prefill), ``rows`` the engine as shipped. Reported: seconds for the whole ``generate`` call, the
ratio, whether greedy decoding produced the same tokens, and the largest difference of the RAIL probabilities
read after the CoTs. Peak memory is the process's largest resident set.
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
LENGTHS = (900, 1000, 1050, 980)


def best(fn: Any, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (oneDNN builds its kernels for the shapes on the first call)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def rows_for(dtype: str, repeats: int, threads: int) -> dict[str, Any]:
    from tract_dist.models.loading import materialize_alias
    from tract_dist.runtime.engine import EngineSpec
    from tract_dist.runtime.hf_engine import HFEngine, build_hf_engine
    from tract_dist.runtime.sampling import SamplingParams

    engine = build_hf_engine(EngineSpec(backend="hf", model_path=str(materialize_alias("smollm2")), dtype=dtype,
                                        batch_size=4, torch_threads=threads))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in LENGTHS]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    score_ids = [engine.tokenizer.encode(str(k), add_special_tokens=False)[-1] for k in range(1, 6)]
    row: dict[str, Any] = {"dtype": dtype, "work": "generate 4 x <=40 after prompts of " + "/".join(map(str, LENGTHS))}
    outs: dict[str, Any] = {}
    shipped = HFEngine._prefill_rows
    for name in ("padded", "rows"):
        engine._prefill_rows = (lambda prompts, width: None) if name == "padded" else shipped.__get__(engine)

        def run() -> Any:
            engine.keep_prompt_cache = True
            gens = engine.generate(prompts, [0] * len(prompts), params)
            seqs = [p + engine.tokenizer.encode(gn.text, add_special_tokens=False) for p, gn in zip(prompts, gens)]
            return gens, engine.score_probs(seqs, score_ids)

        row[f"{name}_s"], outs[name] = best(run, repeats)
    row["speedup"] = round(row["padded_s"] / row["rows_s"], 2)
    row["same_text"] = [a.text for a in outs["padded"][0]] == [b.text for b in outs["rows"][0]]
    row["max_rail_prob_diff"] = max(abs(a - b) for pa, pb in zip(outs["padded"][1], outs["rows"][1])
                                    for a, b in zip(pa, pb))
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "row-prefill-cpu-2core"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [rows_for(dtype, args.repeats, args.threads) for dtype in ("bfloat16", "float32")]
    report = {"machine": "cpu-2core", "threads": args.threads, "torch": torch.__version__,
              "load_before": load_before, "load_after": os.getloadavg(), "rows": rows,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    lines = [f"# Per-row CPU prefill vs the padded batch prefill — cpu-2core, {args.threads} thread(s)", "",
             f"`benchmarks/runtime/bench_row_prefill.py`; torch {report['torch']}; load "
             f"{tuple(round(x, 1) for x in load_before)} -> {tuple(round(x, 1) for x in report['load_after'])}; "
             f"peak memory {report['peak_rss_gb']} GB. Best of {args.repeats} after a warm-up; SmolLM2-135M "
             "through `HFEngine.generate` (greedy) then the RAIL read-out from the kept prompt cache.", "",
             "| dtype | work | padded s | rows s | speed-up | same greedy text | max RAIL prob diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['work']} | {r['padded_s']:.2f} | {r['rows_s']:.2f} | {r['speedup']}x | "
              f"{r['same_text']} | {r['max_rail_prob_diff']:.1e} |" for r in rows]
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
