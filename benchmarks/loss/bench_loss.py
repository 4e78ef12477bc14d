"""Benchmark the CoT-RAFT loss head: this project's fused loss against every peer, side by side in one process.

Providers, on identical inputs (fwd+bwd of CE over the CoT rows + lam * MSE of the expected score):
  naive          HF-style custom loss: logits = hidden @ W^T in the input dtype, .float(), F.cross_entropy
                 over all rows + the expected-score MSE from a full softmax at the score rows.
  naive_sliced   the same after slicing the active rows (CE targets or score rows) out before the lm_head.
  compile        torch.compile(naive) (--no-compile skips it).
  liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA) for CE + a separate
                 (score rows x V) matmul for the MSE; ``liger_fp32acc`` the same with accum_dtype=float32.
  cce            Cut Cross-Entropy's linear_cross_entropy (Triton "cce" on CUDA, "torch_compile" on CPU;
                 its default gradient filter, filter_eps="high") + the same score-row matmul.
  fused_torch    tract_dist.loss.cot_raft_loss(kernel="torch").
  fused_triton   tract_dist.loss.cot_raft_loss(kernel="triton") (CUDA).
Peers that do not import or do not run on the device are reported as "unavailable" with the reason.

Batches: "uniform" (every row has a CE target) and "realistic" (80 % of each 512-token sequence is prompt,
ignored), both with one score row per sequence. Each provider's loss and gradients are checked against a
float64 reference of the same inputs (``loss_err``, ``grad_err`` = max |error| / max |reference| for the hidden
states and the lm_head weight): an approximation (e.g. a gradient filter) shows there, not only in time.

Time: median of --iters fwd+bwd after --warmup, providers interleaved round-robin (CUDA events on GPU,
perf_counter on CPU). Peak memory: one extra fwd+bwd per provider (torch.cuda.max_memory_allocated on GPU;
on CPU the profiler's allocator events = exact peak of live torch tensor bytes, gradients included, inputs
excluded). Ratios: to the fastest baseline of the same configuration (every provider but fused_*), to
naive_sliced and to naive. On GPU, ``roofline`` = (6 * active rows * H * V at the bf16/fp32 matmul rate
this run measures on the logits matmul itself) / median time.

  python benchmarks/loss/bench_loss.py                      # CPU: 2048 tokens, H=256, V=128256, bf16+fp32
  python benchmarks/loss/bench_loss.py --device cuda        # GPU: 16384 tokens, H=4096, V=128256, bf16+fp32
  python benchmarks/loss/bench_loss.py --smoke --out DIR    # tiny shapes (the GPU check's --smoke and tests)
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
PROMPT_FRACTION = 0.8  # realistic judge batches: instruction + response + rubric run to ~80 % of the tokens
SCORE_IDS = [28740, 28750, 28770, 28781, 28782]  # Mistral digits 1..5 (all < 32000)
LAM = 1.0
BASELINES = ("naive", "naive_sliced", "compile", "liger", "liger_fp32acc", "cce")
DEFAULT_PROVIDERS = "naive,naive_sliced,compile,liger,liger_fp32acc,cce,fused_torch,fused_triton"

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
        targets[pos < int(PROMPT_FRACTION * seq)] = -100  # prompt tokens
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


def _score_mse(b: dict) -> torch.Tensor:
    """The regression term as peers without it must add it: a small (score rows x V) logits matmul."""
    return _expected_score_mse(b["hidden"][b["score_rows"]] @ b["weight"].T, b)


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


def reference(b: dict, rows_per_block: int = 1024) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The objective and its gradients (hidden, weight) in float64, by autograd over row blocks with the whole
    batch's denominators, so that the paper's shape fits: what every provider should return."""
    h = b["hidden"].detach().double()
    w = b["weight"].detach().double().requires_grad_()
    n_ce, n_sc = int((b["targets"] != -100).sum()), b["score_rows"].numel()
    total, grad_h = 0.0, torch.zeros_like(h)
    for r0 in range(0, h.shape[0], rows_per_block):
        hb = h[r0 : r0 + rows_per_block].clone().requires_grad_()
        logits = hb @ w.T
        loss = F.cross_entropy(logits, b["targets"][r0 : r0 + rows_per_block], ignore_index=-100,
                               reduction="sum") / max(n_ce, 1)
        sel = (b["score_rows"] >= r0) & (b["score_rows"] < r0 + rows_per_block)
        if bool(sel.any()):
            probs = torch.softmax(logits[b["score_rows"][sel] - r0], dim=-1)[:, b["score_ids"]]
            yhat = probs @ b["score_values"].double()
            loss = loss + LAM * ((yhat - b["score_targets"][sel].double()) ** 2).sum() / n_sc
        loss.backward()
        total += float(loss.detach())
        grad_h[r0 : r0 + rows_per_block] = hb.grad
    return total, grad_h, w.grad


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (elementwise-relative is meaningless for entries near 0)."""
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def make_fused(kernel: str, device: torch.device) -> tuple[LossFn | None, str]:
    if kernel == "triton":
        from tract_dist.loss import triton_kernels

        if not triton_kernels.HAS_TRITON:
            return None, "unavailable (triton not importable)"
        if device.type != "cuda":
            return None, "unavailable (the Triton kernels run on CUDA; CPU uses fused_torch)"

    def fused(b: dict) -> torch.Tensor:
        return cot_raft_loss(
            b["hidden"], b["weight"], b["targets"], b["score_rows"], b["score_targets"], b["score_ids"],
            b["score_values"], lam=LAM, kernel=kernel,
        ).loss

    return fused, "ok"


def make_liger(device: torch.device, fp32_accum: bool) -> tuple[LossFn | None, str]:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
        return None, f"unavailable (liger_kernel not importable: {type(exc).__name__})"
    if device.type != "cuda":
        return None, "unavailable (Liger's Triton kernels need CUDA)"
    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, accum_dtype=torch.float32 if fp32_accum else None)

    def liger(b: dict) -> torch.Tensor:
        return flce(b["weight"], b["hidden"], b["targets"]) + LAM * _score_mse(b)

    return liger, "ok"


def make_cce(device: torch.device) -> tuple[LossFn | None, str]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable (cut_cross_entropy not importable: {type(exc).__name__})"
    impl = "cce" if device.type == "cuda" else "torch_compile"

    def cce(b: dict) -> torch.Tensor:
        ce = linear_cross_entropy(b["hidden"], b["weight"], b["targets"], ignore_index=-100, impl=impl)
        return ce + LAM * _score_mse(b)

    return cce, f"ok ({impl})"


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


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, iters: int = 10) -> float:
    """Measured rate of the logits matmul itself ((m x k) @ (k x n)), the roofline's yardstick."""
    a = torch.randn(m, k, device=device).to(dtype)
    bt = torch.randn(n, k, device=device).to(dtype)
    for _ in range(3):
        a @ bt.T
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ bt.T
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * m * k * n / (statistics.median(times) * 1e-3) / 1e12


def run_config(args, device, dtype, n, v, kind, providers: dict[str, LossFn | None], notes: dict[str, str]) -> list[dict]:
    """Check, warm up and measure memory per provider, then time them *interleaved* (round-robin), so that
    load from other processes on a shared machine hits every provider alike."""
    b = make_batch(n, args.hidden, v, dtype, device, kind)
    n_active = int(((b["targets"] != -100).sum() + b["score_rows"].numel()).item())
    ref, ref_gh, ref_gw = reference(b)
    rows: dict[str, dict] = {}
    ready: list[str] = []
    for name, fn in providers.items():
        row = dict(batch=kind, tokens=n, active_rows=n_active, hidden=args.hidden, vocab=v,
                   dtype=str(dtype).replace("torch.", ""), impl=name, note=notes.get(name, ""))
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
            row["loss_err"] = abs(row["loss"] - ref) / abs(ref)
            _zero_grads(b)
            fn(b).backward()
            row["grad_err_hidden"] = _rel(b["hidden"].grad, ref_gh)
            row["grad_err_weight"] = _rel(b["weight"].grad, ref_gw)
            for _ in range(args.warmup):
                time_once(fn, b, device)
            _zero_grads(b)
            _, peak = peak_tensor_bytes(lambda: fn(b).backward(), device)
            row["peak_mib"] = peak / 2**20
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
            times[name].append(time_once(providers[name], b, device))  # type: ignore[arg-type]
    tflops = matmul_tflops(n_active, args.hidden, v, dtype, device) if device.type == "cuda" else None
    for name in ready:
        t = times[name]
        r = rows[name]
        r.update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), iters=len(t))
        if tflops:
            r["matmul_tflops"] = tflops
            r["roofline"] = 6 * n_active * args.hidden * v / (tflops * 1e12) * 1e3 / r["median_ms"]
        print(f"  {r['dtype']:8s} {kind:9s} N={n:<6d} V={v:<7d} {name:14s} {r['median_ms']:10.1f} ms "
              f"{r['peak_mib']:10.1f} MiB  loss_err={r['loss_err']:.1e} grad_err={r['grad_err_hidden']:.1e}/"
              f"{r['grad_err_weight']:.1e}", flush=True)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    base_ok = [r for r in ok if r["impl"] in BASELINES]
    fastest = min(base_ok, key=lambda r: r["median_ms"]) if base_ok else None
    for r in ok:
        if fastest is not None:
            r["fastest_baseline"] = fastest["impl"]
            r["time_vs_fastest"] = r["median_ms"] / fastest["median_ms"]
            r["mem_vs_fastest"] = r["peak_mib"] / fastest["peak_mib"] if fastest["peak_mib"] else None
        for base in ("naive_sliced", "naive"):
            other = rows.get(base)
            if other is not None and other["status"] == "ok":
                r[f"time_vs_{base}"] = r["median_ms"] / other["median_ms"]
                r[f"mem_vs_{base}"] = r["peak_mib"] / other["peak_mib"] if other["peak_mib"] else None
    del b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    head = ("| dtype | batch | tokens | active | vocab | impl | median ms | peak MiB | loss err | grad err h / W | "
            "time / fastest baseline | mem / fastest | time / naive_sliced | mem / naive_sliced | mem / naive | "
            "roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lead = f"| {r['dtype']} | {r['batch']} | {r['tokens']} | {r['active_rows']} | {r['vocab']} | {r['impl']} |"
        if r["status"] != "ok":
            lines.append(f"{lead} {r['status']} |" + " |" * 10)
            continue
        fastest = f"{f(r.get('time_vs_fastest'), '.2f')} ({r.get('fastest_baseline', '-')})"
        lines.append(
            f"{lead} {r['median_ms']:.1f} | {r['peak_mib']:.1f} | {r['loss_err']:.1e} | "
            f"{r['grad_err_hidden']:.1e} / {r['grad_err_weight']:.1e} | {fastest} | "
            f"{f(r.get('mem_vs_fastest'), '.3f')} | {f(r.get('time_vs_naive_sliced'), '.2f')} | "
            f"{f(r.get('mem_vs_naive_sliced'), '.3f')} | {f(r.get('mem_vs_naive'), '.3f')} | "
            f"{f(r.get('roofline'), '.2f')} |"
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
                key = f"{r['dtype']}_{r['batch']}_N{r['tokens']}_V{r['vocab']}_{r['impl']}"
                mlflow.log_metric(f"{key}_median_ms", r["median_ms"])
                mlflow.log_metric(f"{key}_peak_mib", r["peak_mib"])
        mlflow.log_dict({"meta": meta, "rows": rows}, "bench_loss.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tokens", default=None, help="comma list; default 16384 on GPU, 2048 on CPU")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 on GPU, 256 on CPU")
    p.add_argument("--vocab", default="128256")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--batches", default="uniform,realistic")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(naive)")
    p.add_argument("--sliced-uniform", action="store_true", help="run naive_sliced on uniform batches too")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations: checks the script runs")
    p.add_argument("--out", default=None, help="output stem (.json and .md); default benchmarks/results/loss-<machine>")
    p.add_argument("--mlflow", default=None, metavar="URI", help="also log to this MLflow tracking URI")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens = args.tokens or "1024"
        args.hidden = args.hidden or 32
        args.vocab = "4099"
        args.warmup, args.iters = 1, 2
    elif args.iters < 10:
        p.error("--iters must be >= 10 (median of at least 10)")
    return args


def build_providers(names: list[str], device: torch.device) -> tuple[dict[str, LossFn | None], dict[str, str]]:
    providers: dict[str, LossFn | None] = {}
    notes: dict[str, str] = {}
    for name in names:
        if name == "naive":
            providers[name] = naive
        elif name == "naive_sliced":
            providers[name] = naive_sliced
        elif name == "compile":
            providers[name] = torch.compile(naive, dynamic=False)
        elif name in ("liger", "liger_fp32acc"):
            providers[name], notes[name] = make_liger(device, fp32_accum=name == "liger_fp32acc")
        elif name == "cce":
            providers[name], notes[name] = make_cce(device)
        elif name in ("fused_torch", "fused_triton"):
            providers[name], notes[name] = make_fused(name.split("_")[1], device)
        else:
            raise SystemExit(f"unknown provider {name}")
    return providers, notes


def _git_commit() -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes), so a result names the code it measured."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tract_dist", "benchmarks/loss"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> dict:
    """Run every configuration; write ``<out>.json`` and ``<out>.md``; return the report."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.tokens = args.tokens or ("16384" if gpu else "2048")
    args.hidden = args.hidden or (4096 if gpu else 256)
    names = [n for n in args.providers.split(",") if not (n == "compile" and args.no_compile)]
    providers, notes = build_providers(names, device)
    machine = machine_name(device)
    meta = dict(
        machine=machine, device=str(device), torch=torch.__version__, python=platform.python_version(),
        commit=_git_commit(),
        threads=torch.get_num_threads(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timer="cuda events" if gpu else "time.perf_counter",
        memory="torch.cuda.max_memory_allocated - baseline" if gpu else
        "torch profiler CPU allocator events: peak live tensor bytes during fwd+bwd (inputs excluded)",
        args=dict(vars(args)), notes=notes,
        loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    print(f"# {machine}  torch {torch.__version__}  H={args.hidden}", flush=True)
    rows: list[dict] = []
    for dt_name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
        for v in [int(x) for x in args.vocab.split(",")]:
            for n in [int(x) for x in args.tokens.split(",")]:
                for kind in args.batches.split(","):
                    rows += run_config(args, device, dtype, n, v, kind, providers, notes)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    md = format_table(rows)
    print(md)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"loss-{machine}"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# CoT-RAFT loss benchmark: {machine}\n\n"
        f"`python benchmarks/loss/bench_loss.py {' '.join(sys.argv[1:])}` at commit {meta['commit']}: torch "
        f"{meta['torch']}, hidden "
        f"{args.hidden}, {meta['threads']} threads, {meta['date']}. Time: median of {args.iters} fwd+bwd after "
        f"{args.warmup} warm-up, providers interleaved ({meta['timer']}). Memory: {meta['memory']}. Loss and grad "
        f"err: relative to a float64 reference of the same inputs (grads: max-norm). Load average at start/end: {meta['loadavg_start']} / "
        f"{meta['loadavg_end']}.\n\nProvider notes: {json.dumps(notes)}\n\n{md}\n"
    )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if args.mlflow:
        log_mlflow(args.mlflow, meta, rows)
    return report


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
