"""Benchmark the CoT-RAFT loss: naive materialised logits vs this project's fused loss vs Liger-Kernel.

Implementations, run side by side in one process on identical inputs:
  naive         HF-style custom loss: logits = hidden @ W^T in the input dtype, .float(), F.cross_entropy
                over all rows + expected-score MSE from a full softmax at the score rows.
  naive_sliced  the same, but the active rows (CE targets or score rows) are sliced out before the lm_head.
  fused         tract_dist.loss.cot_raft_loss(impl="fused").
  liger         LigerFusedLinearCrossEntropyLoss for CE + a separate small (score rows x V) matmul for the
                MSE term; only if liger_kernel imports and CUDA is present, else reported "unavailable".
  compile       torch.compile(naive), with --compile.

Batches: "uniform" (every row has a CE target) and "realistic" (80 % of each sequence is prompt, ignored).
Time: median of --iters fwd+bwd after --warmup, implementations interleaved round-robin (CUDA events
on GPU, perf_counter on CPU). Peak memory:
one extra fwd+bwd per implementation, measured by tract_dist.loss.memory_probe (torch.cuda
max_memory_allocated on GPU; on CPU the profiler's allocator events = exact peak of live torch tensor
bytes, gradients included, inputs excluded).

  python benchmarks/loss/bench_loss.py                      # CPU: reduced shapes, fp32
  python benchmarks/loss/bench_loss.py --tokens 8192,16384  # GPU defaults are the full shapes already
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tract_dist.loss import cot_raft_loss  # noqa: E402
from tract_dist.loss.memory_probe import peak_tensor_bytes  # noqa: E402

SEQ_LEN = 512  # tokens per sequence; one score row per sequence
SCORE_IDS = [28740, 28750, 28770, 28781, 28782]  # Mistral digits 1..5 (all < 32000)
LAM = 1.0

LossFn = Callable[[dict], torch.Tensor]


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def make_batch(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, kind: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    seq = min(SEQ_LEN, n)
    pos = torch.arange(n) % seq
    if kind == "realistic":
        targets[pos < int(0.8 * seq)] = -100  # prompt tokens
    score_rows = torch.nonzero(pos == seq - 2).squeeze(1)
    targets[score_rows] = -100
    ids = SCORE_IDS if max(SCORE_IDS) < v else list(range(v - 5, v))
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets.to(device),
        score_rows=score_rows.to(device),
        score_targets=(torch.rand(score_rows.numel(), generator=g) * 4 + 1).to(device),
        score_ids=torch.tensor(ids, device=device),
        score_values=torch.arange(1.0, 6.0, device=device),
    )


def _expected_score_mse(score_logits: torch.Tensor, b: dict) -> torch.Tensor:
    probs = torch.softmax(score_logits.float(), dim=-1)[:, b["score_ids"]]
    yhat = probs @ b["score_values"]
    return ((yhat - b["score_targets"]) ** 2).mean()


def naive(b: dict) -> torch.Tensor:
    logits = (b["hidden"] @ b["weight"].T).float()
    ce = F.cross_entropy(logits, b["targets"], ignore_index=-100)
    return ce + LAM * _expected_score_mse(logits[b["score_rows"]], b)


def naive_sliced(b: dict) -> torch.Tensor:
    active = b["targets"] != -100
    active[b["score_rows"]] = True
    rows = torch.nonzero(active).squeeze(1)
    logits = (b["hidden"][rows] @ b["weight"].T).float()
    ce = F.cross_entropy(logits, b["targets"][rows], ignore_index=-100)
    pos = torch.searchsorted(rows, b["score_rows"])
    return ce + LAM * _expected_score_mse(logits[pos], b)


def fused(b: dict) -> torch.Tensor:
    return cot_raft_loss(
        b["hidden"], b["weight"], b["targets"], b["score_rows"], b["score_targets"], b["score_ids"],
        b["score_values"], lam=LAM,
    ).loss


def make_liger(device: torch.device) -> tuple[LossFn | None, str]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
        return None, f"unavailable (liger_kernel not importable: {type(exc).__name__})"
    if device.type != "cuda":
        return None, "unavailable (Liger's Triton kernels need CUDA)"
    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

    def liger(b: dict) -> torch.Tensor:
        ce = flce(b["weight"], b["hidden"], b["targets"])
        score_logits = b["hidden"][b["score_rows"]] @ b["weight"].T  # (M, V): small
        return ce + LAM * _expected_score_mse(score_logits, b)

    return liger, "ok"


def _zero_grads(b: dict) -> None:
    b["hidden"].grad = None
    b["weight"].grad = None


def time_once(fn: LossFn, b: dict, device: torch.device) -> float:
    """Milliseconds of one fwd+bwd."""
    _zero_grads(b)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(b).backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(b).backward()
    return (time.perf_counter() - t0) * 1e3


def peak_mib(fn: LossFn, b: dict, device: torch.device) -> float:
    _zero_grads(b)
    _, peak = peak_tensor_bytes(lambda: fn(b).backward(), device)
    return peak / 2**20


def run_config(args, device, dtype, n, v, kind, impls: dict[str, LossFn | None], notes: dict[str, str]) -> list[dict]:
    """Warm up and measure memory per implementation, then time them *interleaved* (round-robin), so
    that load from other processes on a shared machine hits every implementation alike."""
    b = make_batch(n, args.hidden, v, dtype, device, kind)
    n_active = int(((b["targets"] != -100).sum() + b["score_rows"].numel()).item())
    rows: dict[str, dict] = {}
    ready: list[str] = []
    for name, fn in impls.items():
        row = dict(batch=kind, tokens=n, active_rows=n_active, hidden=args.hidden, vocab=v,
                   dtype=str(dtype).replace("torch.", ""), impl=name)
        rows[name] = row
        if fn is None:
            row["status"] = notes[name]
            continue
        if name == "naive_sliced" and n_active == n and not args.sliced_uniform:
            row["status"] = "skipped (every row active: same work as naive; --sliced-uniform runs it)"
            continue
        try:
            with torch.no_grad():
                row["loss"] = float(fn(b))
            for _ in range(args.warmup):
                time_once(fn, b, device)
            row["peak_mib"] = peak_mib(fn, b, device)
            row["status"] = "ok"
            ready.append(name)
        except Exception as exc:  # noqa: BLE001 - report (e.g. OOM, compile failure) and go on
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in ready}
    for i in range(args.iters):
        for j in range(len(ready)):
            name = ready[(i + j) % len(ready)]
            times[name].append(time_once(impls[name], b, device))  # type: ignore[arg-type]
    for name in ready:
        t = times[name]
        rows[name].update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), iters=len(t))
        print(f"  {kind:9s} N={n:<6d} V={v:<7d} {name:13s} {rows[name]['median_ms']:10.1f} ms "
              f"{rows[name]['peak_mib']:10.1f} MiB  loss={rows[name]['loss']:.6f}", flush=True)
    for base in ("naive", "liger"):
        ref = rows.get(base)
        if ref is None or ref["status"] != "ok":
            continue
        for r in rows.values():
            if r["status"] == "ok":
                r[f"time_vs_{base}"] = r["median_ms"] / ref["median_ms"]
                r[f"mem_vs_{base}"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
    del b
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    head = "| batch | tokens | active | vocab | impl | median ms | peak MiB | time/naive | mem/naive | time/liger | mem/liger | loss |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['batch']} | {r['tokens']} | {r['active_rows']} | {r['vocab']} | {r['impl']} | "
                         f"{r['status']} | | | | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['tokens']} | {r['active_rows']} | {r['vocab']} | {r['impl']} | {r['median_ms']:.1f} | "
            f"{r['peak_mib']:.1f} | {f(r.get('time_vs_naive'), '.2f')} | {f(r.get('mem_vs_naive'), '.3f')} | "
            f"{f(r.get('time_vs_liger'), '.2f')} | {f(r.get('mem_vs_liger'), '.3f')} | {r['loss']:.5f} |"
        )
    return "\n".join(lines)


def log_mlflow(uri: str, meta: dict, rows: list[dict]) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("loss-benchmark")
    with mlflow.start_run(run_name=f"bench_loss-{meta['machine']}"):
        mlflow.log_params({k: v for k, v in meta.items() if k != "args"} | meta["args"])
        for r in rows:
            if r["status"] == "ok":
                key = f"{r['batch']}_N{r['tokens']}_V{r['vocab']}_{r['impl']}"
                mlflow.log_metric(f"{key}_median_ms", r["median_ms"])
                mlflow.log_metric(f"{key}_peak_mib", r["peak_mib"])
        mlflow.log_dict({"meta": meta, "rows": rows}, "bench_loss.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokens", default=None, help="comma list; default 8192,16384 on GPU, 1024,2048 on CPU")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 on GPU, 256 on CPU")
    p.add_argument("--vocab", default="32000,128256")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--batches", default="uniform,realistic")
    p.add_argument("--impls", default="naive,naive_sliced,fused,liger")
    p.add_argument("--compile", action="store_true", help="also run torch.compile(naive)")
    p.add_argument("--sliced-uniform", action="store_true", help="run naive_sliced on uniform batches too")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="default benchmarks/results/loss-<machine>.json")
    p.add_argument("--mlflow", default=None, metavar="URI", help="also log to this MLflow tracking URI")
    args = p.parse_args(argv)
    if args.iters < 10:
        p.error("--iters must be >= 10 (median of at least 10)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.tokens = args.tokens or ("8192,16384" if gpu else "1024,2048")
    args.hidden = args.hidden or (4096 if gpu else 256)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    wanted = args.impls.split(",") + (["compile"] if args.compile else [])
    impls: dict[str, LossFn | None] = {}
    notes: dict[str, str] = {}
    table = {"naive": naive, "naive_sliced": naive_sliced, "fused": fused}
    for name in wanted:
        if name in table:
            impls[name] = table[name]
        elif name == "liger":
            impls[name], notes[name] = make_liger(device)
        elif name == "compile":
            impls[name] = torch.compile(naive, dynamic=False)
        else:
            raise SystemExit(f"unknown impl {name}")

    machine = machine_name(device)
    meta = dict(
        machine=machine, device=str(device), torch=torch.__version__, python=platform.python_version(),
        threads=torch.get_num_threads(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timer="cuda events" if gpu else "time.perf_counter",
        memory="torch.cuda.max_memory_allocated - baseline" if gpu else
        "torch profiler CPU allocator events: peak live tensor bytes during fwd+bwd (inputs excluded)",
        args=dict(vars(args)), notes=notes,
        loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    print(f"# {machine}  torch {torch.__version__}  dtype {args.dtype}  H={args.hidden}", flush=True)
    rows: list[dict] = []
    for v in [int(x) for x in args.vocab.split(",")]:
        for n in [int(x) for x in args.tokens.split(",")]:
            for kind in args.batches.split(","):
                rows += run_config(args, device, dtype, n, v, kind, impls, notes)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    md = format_table(rows)
    print(md)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"loss-{machine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# CoT-RAFT loss benchmark: {machine}\n\n"
        f"torch {meta['torch']}, {args.dtype}, hidden {args.hidden}, {meta['threads']} threads, "
        f"{meta['date']}. Time: median of {args.iters} fwd+bwd after {args.warmup} warm-up, implementations "
        f"interleaved ({meta['timer']}). "
        f"Memory: {meta['memory']}. Load average at start/end: {meta['loadavg_start']} / "
        f"{meta['loadavg_end']} (shared machine: other processes may inflate times).\n\n{md}\n"
    )
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.mlflow:
        log_mlflow(args.mlflow, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
