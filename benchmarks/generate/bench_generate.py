"""Generation throughput vs batch size and vs number of replicas, reported as ratios from one run.

CPU (default): the batch-size sweep runs the generation engine in-process; the replica sweep runs the same
work through the Ray Data actor pool (``runtime.pool.map_rows`` + ``CotWorker``) with 1 and 2 replicas.
GPU: ``--device cuda --model random-1b`` (a random-initialised ~1.2B Llama, Llama-3.2-1B shape, bf16) runs
the batch-size sweep without Ray (one GPU: no replica sweep).

    python benchmarks/generate/bench_generate.py                      # tiny model, CPU, writes results/
    python benchmarks/generate/bench_generate.py --model smollm2 --prompts 8 --max-new-tokens 8
    python benchmarks/generate/bench_generate.py --device cuda --model random-1b --out results/generate-h100

Prompts are the real Vicuna Bench judge prompts, cut to ``--prompt-tokens`` through the project's truncation
(so every row has about the same length), rendered with the model's chat template. Sampling uses the
per-row seeded sampler, like the real pipeline. Each measurement is preceded by a warm-up batch.
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

from tract_dist.runtime.sampling import SamplingParams  # noqa: E402


def build_model(name: str, device: str, workdir: Path) -> str:
    """A model path: the tiny export, the SmolLM2 alias, or a random ~1B Llama folder (GPU benchmark)."""
    if name == "tiny":
        from tract_dist.generate.tiny_export import save_tiny_export

        return str(save_tiny_export(workdir / "tiny", "smollm2"))
    if name == "random-1b":
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from tract_dist.data.assets import load_tokenizer

        tok = load_tokenizer("llama3")
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        out = workdir / "random-1b"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return str(out)
    return name  # smollm2 alias or any HF folder


def load_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> list[list[int]]:
    from tract_dist.data.encode import EncodeOptions, fit_prompt
    from tract_dist.data.formats import read_examples

    shared = Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data"))
    data = shared / "prometheus-eval" / "vicuna_eval.json"
    exs = read_examples(str(data), "prometheus-eval", require_feedback=False, limit=n).examples
    return [fit_prompt(tokenizer, ex, prompt_tokens, EncodeOptions())[0] for ex in exs]


def sweep_batch_sizes(model_path: str, device: str, prompts: list[list[int]], sizes: list[int],
                      params: SamplingParams, repeats: int) -> list[dict[str, Any]]:
    """In-process engine: prompts/s and generated tokens/s per batch size over the same prompts.

    The sweep runs ``repeats`` times in alternating order (1..8, 8..1, ...) and keeps each size's best run, so a
    burst of load from other processes on a shared machine does not land on one size only.
    """
    import torch

    from tract_dist.models.loading import load_causal_lm, load_tokenizer_for, materialize_alias
    from tract_dist.runtime.hf_engine import HFEngine

    engine = HFEngine(load_causal_lm(model_path, device=device), load_tokenizer_for(materialize_alias(model_path)))
    engine.generate(prompts[:1], [0], params)  # warm-up (allocator, stop-string tables, kernels)
    runs: dict[int, list[dict[str, Any]]] = {bs: [] for bs in sizes}
    order = [bs for k in range(repeats) for bs in (sizes if k % 2 == 0 else sizes[::-1])]
    for bs in order:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), bs):
            gens = engine.generate(prompts[i:i + bs], list(range(i, i + len(prompts[i:i + bs]))), params)
            tokens += sum(g.new_tokens for g in gens)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        runs[bs].append({"batch_size": bs, "prompts": len(prompts), "seconds": secs,
                         "prompts_per_s": len(prompts) / secs, "tokens_per_s": tokens / secs, "tokens": tokens})
        print(f"batch {bs:>3}: {len(prompts) / secs:8.2f} prompts/s {tokens / secs:9.1f} tok/s", flush=True)
    return [{**max(rs, key=lambda r: r["tokens_per_s"]), "all_tokens_per_s": [r["tokens_per_s"] for r in rs]}
            for bs, rs in runs.items()]


def sweep_replicas(model_path: str, prompts_ex: list[Any], replica_counts: list[int], batch_size: int,
                   params: SamplingParams, max_length: int, repeats: int, threads: int) -> list[dict[str, Any]]:
    """Ray Data actor pool per pool size: end-to-end rates (actor start and model load included) and generation
    rates over the pool's makespan (first batch start to last batch end, from the workers' wall clocks)."""
    import ray

    from tract_dist.generate.pipeline import work_rows
    from tract_dist.generate.worker import CotWorker
    from tract_dist.runtime.engine import EngineSpec
    from tract_dist.runtime.pool import PoolSpec, map_rows

    ray.init(num_cpus=4, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False)
    rows_in = work_rows(prompts_ex, 1, 0)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in replica_counts}
    order = [n for k in range(repeats) for n in (replica_counts if k % 2 == 0 else replica_counts[::-1])]
    try:
        for n in order:
            spec = PoolSpec(use_ray=True, replicas=n, batch_size=batch_size, cpus_per_replica=0.5,
                            threads_per_replica=threads)
            engine = EngineSpec(backend="hf", model_path=model_path, batch_size=batch_size,
                                torch_threads=spec.torch_threads())
            kwargs = {"engine": engine.as_dict(), "sampling": params.as_dict(),
                      "encode_opts": {"max_length": max_length, "system_prompt": None, "scale": [1, 5]}}
            t0 = time.perf_counter()
            recs_all: list[dict[str, Any]] = []
            for recs in map_rows(rows_in, CotWorker, kwargs, spec):
                recs_all += recs
            end = time.perf_counter()
            done = len(recs_all)
            tokens = sum(r["new_tokens"] for r in recs_all)
            # generation makespan: first batch start to last batch end, across replicas (model loading excluded)
            starts = [r["batch_end_time"] - r["batch_seconds"] for r in recs_all if r["batch_end_time"]]
            span = max(r["batch_end_time"] for r in recs_all if r["batch_end_time"]) - min(starts)
            row = {"replicas": n, "prompts": done, "seconds_end_to_end": end - t0, "generation_seconds": span,
                   "prompts_per_s_end_to_end": done / (end - t0), "tokens_per_s_end_to_end": tokens / (end - t0),
                   "steady_prompts_per_s": done / span, "steady_tokens_per_s": tokens / span,
                   "torch_threads_per_replica": spec.torch_threads()}
            runs[n].append(row)
            print(f"replicas {n}: {row['prompts_per_s_end_to_end']:.2f} prompts/s end-to-end, "
                  f"{row['steady_prompts_per_s']:.2f} while generating", flush=True)
    finally:
        ray.shutdown()
    return [{**max(rs, key=lambda r: r["steady_prompts_per_s"]),
             "all_steady_prompts_per_s": [r["steady_prompts_per_s"] for r in rs],
             "all_prompts_per_s_end_to_end": [r["prompts_per_s_end_to_end"] for r in rs]}
            for n, rs in runs.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | random-1b | HF folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=480)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--replicas", default="1,2", help="replica counts for the Ray sweep (CPU only; '' to skip)")
    ap.add_argument("--replica-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="sweeps in alternating order; each point keeps its best")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per replica (and in-process); 1 keeps replica scaling comparable and "
                         "avoids OpenMP spin-wait collapse on a loaded 2-core machine")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generate-cpu-2core"),
                    help="results path without extension (.json and .md are written)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from tract_dist.data.formats import read_examples
    from tract_dist.models.loading import load_tokenizer_for, materialize_alias

    # stop=() and EOS kept: a random model rarely emits EOS, so rows generate max_new_tokens (counted exactly)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens, stop=())
    load_avg = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(args.model, args.device, Path(tmp))
        tok = load_tokenizer_for(materialize_alias(model_path))
        prompts = load_prompts(tok, args.prompts, args.prompt_tokens)
        sizes = [int(x) for x in args.batch_sizes.split(",") if x]
        batch_rows = sweep_batch_sizes(model_path, args.device, prompts, sizes, params, args.repeats)
        replica_rows: list[dict[str, Any]] = []
        counts = [int(x) for x in args.replicas.split(",") if x]
        if args.device == "cpu" and counts:
            data = Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data"))
            exs = read_examples(str(data / "prometheus-eval" / "vicuna_eval.json"), "prometheus-eval",
                                require_feedback=False, limit=args.prompts).examples
            replica_rows = sweep_replicas(model_path, exs, counts, args.replica_batch_size, params,
                                          args.prompt_tokens + args.max_new_tokens, args.repeats, args.threads)
    base_b = batch_rows[0]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                    "torch": torch.__version__, "load_average_at_start": load_avg,
                    "load_average_at_end": os.getloadavg(), "wall_seconds": time.time() - t_start},
        "settings": {"model": args.model, "prompts": len(prompts), "prompt_tokens_max": args.prompt_tokens,
                     "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
                     "max_new_tokens": args.max_new_tokens, "sampling": params.as_dict(),
                     "replica_batch_size": args.replica_batch_size, "repeats": args.repeats,
                     "torch_threads": args.threads if args.device == "cpu" else None},
        "batch_size_sweep": batch_rows,
        "batch_size_ratios": {str(r["batch_size"]): r["tokens_per_s"] / base_b["tokens_per_s"] for r in batch_rows},
        "replica_sweep": replica_rows,
        "replica_ratios_end_to_end": {str(r["replicas"]): r["prompts_per_s_end_to_end"]
                                      / replica_rows[0]["prompts_per_s_end_to_end"] for r in replica_rows},
        "replica_ratios_steady": {str(r["replicas"]): (r["steady_prompts_per_s"] or 0)
                                  / (replica_rows[0]["steady_prompts_per_s"] or 1) for r in replica_rows},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(render_md(result), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("batch_size_ratios", "replica_ratios_end_to_end",
                                              "replica_ratios_steady")}, indent=2))


def render_md(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    lines = [f"# Generation throughput — {m['device']} ({m['gpu'] or str(m['cpu_count']) + ' cores'})", "",
             f"Model `{s['model']}`, {s['prompts']} Vicuna prompts (mean {s['prompt_tokens_mean']:.0f} tokens), "
             f"{s['max_new_tokens']} new tokens each, sampled (T=1, top-p 0.9, per-row seeds). "
             f"Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}, "
             f"at end {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}: a shared machine, so each point "
             f"is the best of {s['repeats']} sweeps in alternating order; compare ratios, not absolute rates.", "",
             f"## Batch size (one replica, in-process, {s['torch_threads']} torch thread(s))", "",
             "| batch | prompts/s | tokens/s | ratio vs batch 1 |",
             "|---|---|---|---|"]
    for row in r["batch_size_sweep"]:
        lines.append(f"| {row['batch_size']} | {row['prompts_per_s']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{r['batch_size_ratios'][str(row['batch_size'])]:.2f} |")
    if r["replica_sweep"]:
        lines += ["", f"## Replicas (Ray Data actor pool, batch {s['replica_batch_size']})", "",
                  "| replicas | threads/replica | prompts/s end-to-end | ratio | prompts/s generating | ratio |",
                  "|---|---|---|---|---|---|"]
        for row in r["replica_sweep"]:
            k = str(row["replicas"])
            lines.append(f"| {k} | {row['torch_threads_per_replica']} | {row['prompts_per_s_end_to_end']:.2f} | "
                         f"{r['replica_ratios_end_to_end'][k]:.2f} | {row['steady_prompts_per_s'] or 0:.2f} | "
                         f"{r['replica_ratios_steady'][k]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
