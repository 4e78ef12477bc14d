"""Judge server throughput and latency: requests/s, p50 and p95 at 1, 4 and 16 concurrent clients, with request
batching on (``serve.batch``, up to 16 inputs within 10 ms) and off (batches of one), side by side in one process.

Both applications run on one Ray Serve at once (same replica count, same threads), and every concurrency level
measures them in alternating order, so a machine whose load drifts (a shared CI box) penalises both alike.
Requests go over real HTTP to 127.0.0.1 (``POST /v1/judge``, mode rail by default: one forward pass per input,
the read-out an RL trainer's reward calls pay), from asyncio clients in this process.

    python benchmarks/serve/bench_serve.py --model smollm2 --requests 8,16,32
    python benchmarks/serve/bench_serve.py --model tiny --requests 60,120,240 --tag tiny   # serving overhead

Writes benchmarks/results/serve-<machine>[-tag].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CONCURRENCY = (1, 4, 16)


def machine_name() -> str:
    import torch

    return f"gpu-{torch.cuda.get_device_name(0).replace(' ', '_')}" if torch.cuda.is_available() else \
        f"cpu-{os.cpu_count()}core"


def load_inputs(n: int, chars: int) -> list[dict]:
    from tract_dist.data.formats import read_examples

    exs = read_examples(str(REPO / "data/quickstart/vicuna_eval_0-15.jsonl"), "jsonl", require_feedback=False).examples
    return [{"instruction": e.instruction, "response": e.response[:chars], "criteria": e.criteria,
             "score_descriptions": list(e.score_descriptions)} for e in (exs * (n // len(exs) + 1))[:n]]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def measure(url: str, inputs: list[dict], concurrency: int, mode: str) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(i: int, x: dict) -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                r = await client.post(url, json={"input": dict(x, id=str(i)), "mode": mode})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200 or r.json()["result"]["id"] != str(i):
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs)))
        wall = time.perf_counter() - t0
    return {"requests": len(inputs), "errors": errors, "wall_s": round(wall, 3), "rps": round(len(inputs) / wall, 3),
            "p50_s": round(percentile(lat, 0.5), 3), "p95_s": round(percentile(lat, 0.95), 3),
            "mean_s": round(statistics.fmean(lat), 3)}


def main() -> int:
    from tract_dist import console

    console.attach()  # an entry point: the library's console lines (logged) on this terminal
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="alias, HF folder, or 'tiny' (a random tiny Llama)")
    p.add_argument("--requests", default="8,16,32", help="requests at 1, 4 and 16 clients")
    p.add_argument("--mode", default="rail", choices=["rail", "cot_rail", "decode"])
    p.add_argument("--chars", type=int, default=300, help="each response cut to this many characters")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    counts = [int(x) for x in args.requests.split(",")]
    assert len(counts) == len(CONCURRENCY), "--requests needs one count per concurrency level (1, 4, 16)"

    import ray
    from ray import serve

    from tract_dist.config import load_config
    from tract_dist.models.loading import materialize_alias
    from tract_dist.runtime.ray_cluster import init_ray
    from tract_dist.serve.app import ServeOptions, build_app, start_http

    if args.model == "tiny":
        from tract_dist.generate.tiny_export import save_tiny_export

        model = str(save_tiny_export(Path(tempfile.mkdtemp(prefix="bench-serve-")) / "model", "smollm2"))
    else:
        model = materialize_alias(args.model)
    cfg = load_config(None, ["model.dtype=float32", "evaluation.backend=hf", "tracking.enabled=false",
                             f"generation.max_new_tokens={args.max_new_tokens}"], base={"model": {"name_or_path": model}})
    load_before = os.getloadavg()
    init_ray(None, num_cpus=max(4, 2 * args.replicas + 2), log_to_driver=False,
             env_vars={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)})
    port = 18000 + os.getpid() % 1000
    start_http("127.0.0.1", port, request_timeout_s=900)
    common = dict(replicas=args.replicas, cpus_per_replica=1, torch_threads=args.threads, request_timeout_s=900)
    serve.run_many([
        serve.RunTarget(build_app(cfg, model, ServeOptions(model_id="on", max_batch_size=16,
                                                           batch_wait_timeout_s=0.01, **common)),
                        name="on", route_prefix="/on"),
        serve.RunTarget(build_app(cfg, model, ServeOptions(model_id="off", max_batch_size=1, **common)),
                        name="off", route_prefix="/off")])
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for conc, n in zip(CONCURRENCY, counts):
            inputs = load_inputs(n, args.chars)
            order = ("on", "off") if conc != 4 else ("off", "on")  # alternate which goes first
            for variant in order:
                handle = serve.get_deployment_handle("JudgeModel", variant)
                asyncio.run(measure(f"{base}/{variant}/v1/judge", inputs[:min(2, n)], 1, args.mode))  # warm
                before = len(handle.recent_batch_sizes.remote().result())
                m = asyncio.run(measure(f"{base}/{variant}/v1/judge", inputs, conc, args.mode))
                sizes = handle.recent_batch_sizes.remote().result()[before:]  # this level's batches (1 replica)
                m.update(batching=variant, concurrency=conc,
                         mean_batch=round(statistics.fmean(sizes), 2) if sizes else None)
                print(json.dumps(m), flush=True)
                rows.append(m)
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()
    import torch

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    result = {"benchmark": "bench_serve", "model": args.model, "mode": args.mode, "chars": args.chars,
              "replicas": args.replicas, "threads_per_replica": args.threads, "commit": rev,
              "machine": {"name": machine_name(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": load_after},
              "rows": rows}
    name = f"serve-{machine_name()}" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(render(result))
    print(f"wrote {out / name}.json/.md")
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Judge server (Ray Serve) — {m['name']}", "",
             f"`benchmarks/serve/bench_serve.py`, model `{r['model']}` (float32, HF), mode `{r['mode']}`, "
             f"responses cut to {r['chars']} characters, {r['replicas']} replica(s) x {r['threads_per_replica']} "
             f"torch threads, POST /v1/judge over HTTP to 127.0.0.1 from asyncio clients in the same process; "
             f"commit {r['commit']}. Batching on: `serve.batch` up to 16 inputs within 10 ms; off: batches of one. "
             f"Load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_before'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in m['loadavg_after'])} ({m['cpu_count']} cores, {m['platform']}).", "",
             "| clients | batching | requests | req/s | p50 s | p95 s | mean batch | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['concurrency']} | {row['batching']} | {row['requests']} | {row['rps']} | "
                     f"{row['p50_s']} | {row['p95_s']} | {row['mean_batch']} | {row['errors']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
