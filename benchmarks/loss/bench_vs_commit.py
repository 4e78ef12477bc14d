"""The fused loss of this checkout against the fused loss of an earlier commit, side by side in one process.

``git show`` extracts ``tract_dist/loss/`` at ``--commit`` into a temporary package (its modules import each
other relatively, so it loads under another name), then both ``cot_raft_loss(impl="fused")`` run
interleaved on the batches of ``bench_loss.py`` (uniform and realistic; bf16 and fp32). Reports the median
fwd+bwd time, the peak tensor memory and the ratio now / then. Used to show a change is no slower.

    python benchmarks/loss/bench_vs_commit.py --commit 409feb6 --out benchmarks/results/loss-vs-409feb6-cpu-2core
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import bench_loss  # noqa: E402

from tract_dist.loss import cot_raft_loss  # noqa: E402
from tract_dist.loss.memory_probe import peak_tensor_bytes  # noqa: E402


def load_loss_package(commit: str, into: Path):
    """``tract_dist.loss`` as it was at ``commit``, imported as the package ``tract_loss_<commit>``."""
    name = f"tract_loss_{commit[:12]}"
    pkg = into / name
    pkg.mkdir(parents=True)
    files = subprocess.run(["git", "ls-tree", "--name-only", commit, "tract_dist/loss/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if f.endswith(".py"):
            text = subprocess.run(["git", "show", f"{commit}:{f}"], cwd=REPO, check=True, capture_output=True,
                                  text=True).stdout
            (pkg / Path(f).name).write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", required=True, help="output stem (.json and .md)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        old = load_loss_package(args.commit, Path(tmp))

        def run(fn):
            def loss(b):
                return fn(b["hidden"], b["weight"], b["targets"], b["score_rows"], b["score_targets"],
                          b["score_ids"], b["score_values"], lam=bench_loss.LAM).loss
            return loss

        impls = {"then": run(old.cot_raft_loss), "now": run(cot_raft_loss)}
        rows = []
        for dt_name in args.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
            for kind in ("uniform", "realistic"):
                b = bench_loss.make_batch(args.tokens, args.hidden, args.vocab, dtype, device, kind)
                times: dict[str, list[float]] = {k: [] for k in impls}
                peaks, losses = {}, {}
                for k, fn in impls.items():
                    bench_loss.time_once(fn, b, device)  # warm-up
                    bench_loss._zero_grads(b)
                    _, peak = peak_tensor_bytes(lambda: fn(b).backward(), device)
                    peaks[k] = peak / 2**20
                    with torch.no_grad():
                        losses[k] = float(fn(b))
                for i in range(args.iters):
                    for k in (list(impls) if i % 2 == 0 else list(reversed(impls))):
                        times[k].append(bench_loss.time_once(impls[k], b, device))
                med = {k: statistics.median(v) for k, v in times.items()}
                row = dict(dtype=dt_name, batch=kind, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab,
                           then_ms=med["then"], now_ms=med["now"], time_ratio=med["now"] / med["then"],
                           then_mib=peaks["then"], now_mib=peaks["now"], mem_ratio=peaks["now"] / peaks["then"],
                           loss_diff=abs(losses["now"] - losses["then"]) / abs(losses["then"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(commit=args.commit, device=bench_loss.machine_name(device), torch=torch.__version__,
                iters=args.iters, command="python benchmarks/loss/bench_vs_commit.py " + " ".join(sys.argv[1:]))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Fused CoT-RAFT loss: this checkout vs commit {args.commit} ({meta['device']})", "",
             f"`{meta['command']}`; torch {meta['torch']}; median of {args.iters} fwd+bwd each, interleaved.", "",
             "| dtype | batch | then ms | now ms | now / then | then MiB | now MiB | mem now / then | loss rel. diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['then_ms']:.1f} | {r['now_ms']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['then_mib']:.1f} | {r['now_mib']:.1f} | {r['mem_ratio']:.2f} | {r['loss_diff']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
