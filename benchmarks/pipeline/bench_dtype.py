"""fp32 against bf16 for the quickstart's model on this CPU, side by side in one process: what
``model.dtype: bfloat16`` in configs/quickstart.yaml buys (or costs, on a CPU without native bf16).

    python benchmarks/pipeline/bench_dtype.py            # one thread, as each quickstart worker and replica has

SmolLM2-135M (the ``smollm2`` alias) at the quickstart's shapes: a training forward + backward over one
700-token sequence (a Vicuna Bench prompt with its CoT), a prefill of 4 x 700 tokens (one replica's batch) and a
generation of 40 new tokens for that batch (the quickstart's max_new_tokens). Each timing is the best of
``--repeats`` after a warm-up; the dtypes alternate. The CPU's bf16 support (AVX512-BF16, AMX) and the load
averages are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def best(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dtype-cpu-2core"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import materialize_alias

    torch.set_num_threads(args.threads)
    path = materialize_alias("smollm2")
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 49000, (1, 700), generator=g)
    batch = torch.randint(0, 49000, (4, 700), generator=g)
    models = {dt: AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    rows: dict[str, dict[str, float]] = {dt: {} for dt in models}
    load_before = os.getloadavg()
    for name in ("train_fwd_bwd_700", "prefill_4x700", "generate_4x40"):
        for dt in (("float32", "bfloat16") if name != "prefill_4x700" else ("bfloat16", "float32")):
            m = models[dt]

            def step() -> None:
                if name == "train_fwd_bwd_700":
                    m(input_ids=one, labels=one).loss.backward()
                    m.zero_grad(set_to_none=True)
                elif name == "prefill_4x700":
                    with torch.no_grad():
                        m(input_ids=batch, logits_to_keep=1)
                else:
                    with torch.no_grad():
                        m.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=40,
                                   min_new_tokens=40, do_sample=False, pad_token_id=0)

            rows[dt][name] = round(best(step, args.repeats), 3)
            print(f"{name} {dt}: {rows[dt][name]} s", flush=True)
    report = {"machine": "cpu-2core", "cpu": platform.processor() or platform.machine(), "bf16_flags": cpu_flags(),
              "threads": args.threads, "torch": torch.__version__, "load_before": load_before,
              "load_after": os.getloadavg(), "seconds": rows,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    lines = [f"# fp32 vs bf16, SmolLM2-135M at the quickstart's shapes — cpu-2core ({report['cpu']}, "
             f"{args.threads} thread(s))", "",
             f"`benchmarks/pipeline/bench_dtype.py`; torch {report['torch']}; CPU bf16 flags: "
             f"{', '.join(report['bf16_flags']) or 'none'}; load {tuple(round(x, 1) for x in load_before)} -> "
             f"{tuple(round(x, 1) for x in report['load_after'])}; peak memory {report['peak_rss_gb']} GB (both "
             "models). Best of the repeats, seconds.", "",
             "| work | fp32 | bf16 | fp32 / bf16 |", "|---|---|---|---|"]
    for name in rows["float32"]:
        a, b = rows["float32"][name], rows["bfloat16"][name]
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
