"""HF generate vs vLLM, side by side in one process: CoT generation tokens/s at batch 1/8/32 and at the
quickstart's shape, and CoT-RAIL examples/s (the judge end to end: CoT, then the RAIL read-out).

    python benchmarks/generate/bench_backends.py                          # SmolLM2-135M, CPU, writes results/
    python benchmarks/generate/bench_backends.py --backends hf --device cuda --model random-1b \
        --out benchmarks/results/generate-backends-h200                      # the HF half on a GPU without vLLM

Both engines get the same real Vicuna Bench judge prompts (cut to ``--prompt-tokens`` by the project's
truncation), the same per-(prompt) seeds and sampling (T=1, top-p 0.9, stop strings off so every row writes
``--max-new-tokens``), the same dtype (the project's rule: fp32 on CPU, bf16 on CUDA) and, on CPU, the same
number of threads. "Batch b" is b requests at a time: HF pads them into one static batch, vLLM schedules them
continuously. Each point is the best of ``--repeats`` runs in alternating order (a shared machine's load bursts
then do not land on one point only); every run is preceded by a warm-up call. Engine start-up is reported apart.
The script needs the ``__main__`` guard: vLLM's engine core is a spawned process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_examples(n: int) -> list[Any]:
    """Vicuna Bench records: the full set beside the checkout when present, else the committed quickstart sample."""
    from tract_dist.data.formats import read_examples

    full = Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data")) / "prometheus-eval" / "vicuna_eval.json"
    if full.is_file():
        exs = read_examples(str(full), "prometheus-eval", require_feedback=False, limit=n).examples
    else:
        exs = read_examples(str(REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"), "jsonl", require_feedback=False).examples
    return [exs[i % len(exs)] for i in range(n)]


def timed_generate(engine: Any, prompts: list[list[int]], batch: int, params: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        gens = engine.generate(prompts[i:i + batch], list(range(i, i + len(prompts[i:i + batch]))), params)
        tokens += sum(g.new_tokens for g in gens)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "prompts_per_s": len(prompts) / secs}


def best(runs: list[dict[str, float]], key: str) -> dict[str, Any]:
    top = max(runs, key=lambda r: r[key])
    return {**top, f"all_{key}": [r[key] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | random-1b | HF folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=480)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--quickstart", default="8,4,40,1536",
                    help="examples,batch,max_new_tokens,max_length of configs/quickstart.yaml's generation ('' skips)")
    ap.add_argument("--rail-examples", type=int, default=8, help="CoT-RAIL examples (0 skips)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for each engine (the same for both)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate-backends-cpu-2core"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from bench_generate import build_model
    from tract_dist.data.encode import EncodeOptions, fit_prompt
    from tract_dist.judge import Judge
    from tract_dist.models.loading import materialize_alias
    from tract_dist.runtime.backend import build_engine
    from tract_dist.runtime.engine import EngineSpec
    from tract_dist.runtime.sampling import SamplingParams

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens, stop=())
    load_start = os.getloadavg()
    t_start = time.time()
    result: dict[str, Any] = {"batch_sweep": {}, "quickstart": {}, "cot_rail": {}, "startup_seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = materialize_alias(build_model(args.model, args.device, Path(tmp)))
        engines: dict[str, Any] = {}
        for b in backends:
            t0 = time.perf_counter()
            engines[b] = build_engine(EngineSpec(backend=b, model_path=model_path, dtype="auto", batch_size=None,
                                                 torch_threads=args.threads, device=args.device))
            result["startup_seconds"][b] = time.perf_counter() - t0
            print(f"{b}: engine up in {result['startup_seconds'][b]:.1f} s", flush=True)
        tok = engines[backends[0]].tokenizer
        exs = load_examples(args.prompts)
        prompts = [fit_prompt(tok, ex, args.prompt_tokens, EncodeOptions())[0] for ex in exs]
        for b in backends:
            engines[b].generate(prompts[:2], [0, 1], params)  # warm-up
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for k in range(args.repeats):
            order = [(b, s) for s in sizes for b in backends]
            for b, s in order if k % 2 == 0 else order[::-1]:
                r = timed_generate(engines[b], prompts, s, params)
                runs.setdefault((b, s), []).append(r)
                print(f"{b:>4} batch {s:>3}: {r['tokens_per_s']:8.1f} tok/s", flush=True)
        for (b, s), rs in runs.items():
            result["batch_sweep"].setdefault(b, {})[str(s)] = best(rs, "tokens_per_s")

        if args.quickstart:
            n, bs, new, max_len = (int(x) for x in args.quickstart.split(","))
            qp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=new, stop=("So the overall", "[RESULT]"))
            qprompts = [fit_prompt(tok, ex, max_len - new, EncodeOptions())[0] for ex in load_examples(n)]
            qruns: dict[str, list[dict[str, float]]] = {}
            for k in range(args.repeats):
                for b in backends if k % 2 == 0 else backends[::-1]:
                    r = timed_generate(engines[b], qprompts, bs, qp)
                    qruns.setdefault(b, []).append(r)
                    print(f"{b:>4} quickstart shape: {r['tokens_per_s']:8.1f} tok/s", flush=True)
            result["quickstart"] = {b: best(rs, "tokens_per_s") for b, rs in qruns.items()}
            result["quickstart_shape"] = {"examples": n, "batch": bs, "max_new_tokens": new, "max_length": max_len,
                                          "prompt_tokens_mean": sum(map(len, qprompts)) / len(qprompts)}

        if args.rail_examples:
            rail_exs = load_examples(args.rail_examples)
            rp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens,
                                stop=("So the overall", "[RESULT]"))
            judges = {b: Judge(engine=engines[b], max_length=args.prompt_tokens + args.max_new_tokens + 32,
                               sampling=rp, batch_size=8) for b in backends}
            rruns: dict[str, list[dict[str, float]]] = {}
            for k in range(args.repeats):
                for b in backends if k % 2 == 0 else backends[::-1]:
                    engines[b].batch_size = 8
                    t0 = time.perf_counter()
                    res = judges[b].score_batch(rail_exs, n_cots=1)
                    secs = time.perf_counter() - t0
                    rruns.setdefault(b, []).append({"seconds": secs, "examples_per_s": len(rail_exs) / secs,
                                                    "failed": sum(r.score is None for r in res)})
                    print(f"{b:>4} CoT-RAIL: {len(rail_exs) / secs:6.3f} examples/s", flush=True)
            result["cot_rail"] = {b: best(rs, "examples_per_s") for b, rs in rruns.items()}

    result["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": args.device,
                         "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                         "torch": torch.__version__, "load_average_at_start": load_start,
                         "load_average_at_end": os.getloadavg(), "wall_seconds": time.time() - t_start}
    result["settings"] = {"model": args.model, "prompts": len(prompts),
                          "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
                          "max_new_tokens": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats,
                          "backends": backends}
    if "hf" in backends and "vllm" in backends:
        result["vllm_over_hf"] = {
            **{f"batch_{s}": result["batch_sweep"]["vllm"][str(s)]["tokens_per_s"]
               / result["batch_sweep"]["hf"][str(s)]["tokens_per_s"] for s in sizes},
            **({"quickstart": result["quickstart"]["vllm"]["tokens_per_s"] / result["quickstart"]["hf"]["tokens_per_s"]}
               if result["quickstart"] else {}),
            **({"cot_rail": result["cot_rail"]["vllm"]["examples_per_s"] / result["cot_rail"]["hf"]["examples_per_s"]}
               if result["cot_rail"] else {}),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(render_md(result), encoding="utf-8")
    print(json.dumps(result.get("vllm_over_hf", {}), indent=2))


def render_md(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    bs = s["backends"]
    lines = [f"# HF generate vs vLLM — {m['device']} ({m['gpu'] or str(m['cpu_count']) + ' cores'})", "",
             f"`benchmarks/generate/bench_backends.py`, model `{s['model']}`, {s['prompts']} Vicuna Bench judge prompts "
             f"(mean {s['prompt_tokens_mean']:.0f} tokens), {s['max_new_tokens']} new tokens each, sampled (T=1, top-p "
             f"0.9, a seed per prompt), {s['threads']} thread(s) per engine on CPU. Load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}; best of {s['repeats']} runs in alternating "
             f"order. Engine start-up: " + ", ".join(f"{b} {r['startup_seconds'][b]:.1f} s" for b in bs) + ".", "",
             "## CoT generation, tokens/s", "", "| batch | " + " | ".join(bs) + (" | vLLM / HF |" if len(bs) == 2 else " |"),
             "|---" * (len(bs) + 1 + (len(bs) == 2)) + "|"]
    for size in r["batch_sweep"][bs[0]]:
        row = [f"{r['batch_sweep'][b][size]['tokens_per_s']:.1f}" for b in bs]
        ratio = [f"{r['vllm_over_hf'][f'batch_{size}']:.2f}"] if "vllm_over_hf" in r else []
        lines.append(f"| {size} | " + " | ".join(row + ratio) + " |")
    if r["quickstart"]:
        q = r["quickstart_shape"]
        row = [f"{r['quickstart'][b]['tokens_per_s']:.1f}" for b in bs]
        ratio = [f"{r['vllm_over_hf']['quickstart']:.2f}"] if "vllm_over_hf" in r else []
        lines.append(f"| quickstart ({q['examples']} prompts of mean {q['prompt_tokens_mean']:.0f} tokens, batch "
                     f"{q['batch']}, {q['max_new_tokens']} new, stop strings on) | " + " | ".join(row + ratio) + " |")
    if r["cot_rail"]:
        lines += ["", "## CoT-RAIL (CoT, then the RAIL read-out), examples/s", "",
                  "| " + " | ".join(bs) + (" | vLLM / HF |" if len(bs) == 2 else " |"),
                  "|---" * (len(bs) + (len(bs) == 2)) + "|",
                  "| " + " | ".join([f"{r['cot_rail'][b]['examples_per_s']:.3f}" for b in bs]
                                    + ([f"{r['vllm_over_hf']['cot_rail']:.2f}"] if "vllm_over_hf" in r else [])) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
