"""Does REAL raise the mean reward on its training prompts? A CPU run of the REAL stage on SmolLM2-135M-Instruct.

The stage itself (``tract_dist.real.stage.run_real``: DeepSpeed ZeRO-3, LoRA, the HF rollout engine in-process
with the inline launcher, or a Ray actor with ``--launcher ray``) on the committed 16 Vicuna Bench records, from
SmolLM2 (or ``--init EXPORT``, e.g. a TRACT stage-2 export). ``real.prompts_per_step`` divides 16, so each epoch
of rounds covers every training prompt once: the mean reward per epoch compares the same prompts, which the
per-round means (different prompts each round) do not. Reports the per-round metrics, the per-epoch means, and
the least-squares slope of reward over rounds with its standard error.

    python benchmarks/real/reward_rise.py --out benchmarks/results/real-reward-rise-cpu-2core        # ~1-2 h here
    python benchmarks/real/reward_rise.py --rounds 8 --out /tmp/rise --max-new-tokens 24            # a short look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def slope(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over 0..n-1 and its standard error."""
    n = len(ys)
    xs = list(range(n))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - (my + b * (x - mx)) for x, y in zip(xs, ys)]
    se = (sum(r * r for r in resid) / max(n - 2, 1) / sxx) ** 0.5
    return b, se


def main(argv: list[str] | None = None) -> int:
    from tract_dist import console

    console.attach()  # an entry point: the library's console lines (logged) on this terminal
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", default=None, help="the export to start from (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=768, help="prompt + CoT budget (prompts are fitted to it)")
    ap.add_argument("--micro", type=int, default=1, help="training.micro_batch_size (memory: CPU attention keeps "
                                                          "its weights for backward; 2 x 1,000 tokens passed 7 GB)")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launcher", default="inline", choices=["inline", "ray"])
    ap.add_argument("--work", default="runs/real-reward-rise")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tract_dist.config import load_config
    from tract_dist.models.loading import materialize_alias
    from tract_dist.real.stage import run_real

    init = a.init or materialize_alias("smollm2")
    base = {
        "model": {"name_or_path": init, "tokenizer": "smollm2" if a.init is None else None,
                  "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train_path": str(REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"), "train_format": "jsonl",
                 "max_length": a.max_length},
        "training": {"output_dir": a.work, "micro_batch_size": a.micro, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                     "save_steps": 4, "max_grad_norm": 1.0, "seed": a.seed},
        "real": {"steps": a.rounds, "prompts_per_step": a.prompts_per_step, "k": a.k,
                 "max_new_tokens": a.max_new_tokens, "learning_rate": a.lr, "lam": a.lam, "seed": a.seed,
                 "rollout_threads": 2, "rollout_cpus": 1},
        "tracking": {"enabled": False},
        "cluster": {"num_workers": 1, "storage_path": f"{a.work}/ray", "max_failures": 0},
    }
    cfg = load_config(None, [], base=base)
    t0 = time.time()
    result = run_real(cfg, init, run_name=f"rise-s{a.seed}", launcher=a.launcher)
    steps = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = 16 // a.prompts_per_step
    rewards = [s["reward_mean"] for s in steps]
    epochs = [statistics.fmean(rewards[i:i + per_epoch]) for i in range(0, len(rewards) - per_epoch + 1, per_epoch)]
    b, se = slope(rewards)
    report = {"machine": f"cpu-{os.cpu_count()}core", "init": init, "seed": a.seed, "rounds": a.rounds,
              "prompts_per_step": a.prompts_per_step, "k": a.k, "max_new_tokens": a.max_new_tokens, "lr": a.lr,
              "lam": a.lam, "wall_s": time.time() - t0, "loadavg": os.getloadavg(), "epoch_reward_means": epochs,
              "slope_per_round": b, "slope_se": se,
              "steps": [{k: s[k] for k in ("step", "reward_mean", "abs_err_mean", "adv_std", "tie_share",
                                           "cot_tokens_mean", "rollout_s", "update_s")} for s in steps]}
    lines = [f"# REAL on {Path(init).name}: mean reward over rounds ({report['machine']}, seed {a.seed})", "",
             f"`benchmarks/real/reward_rise.py`: {a.rounds} rounds x {a.prompts_per_step} prompts x k {a.k}, CoTs up "
             f"to {a.max_new_tokens} tokens, LoRA r 16, lr {a.lr}, λ {a.lam}; {report['wall_s'] / 60:.0f} min, load "
             f"average {report['loadavg'][0]:.1f} at the end.", "",
             "Mean reward (−(ŷ − y)²) per epoch (every training prompt once per epoch): "
             + ", ".join(f"{x:.3f}" for x in epochs) + ".",
             f"Least-squares slope over rounds: {b:+.4f} ± {se:.4f} (standard error) per round.", "",
             "| round | reward | abs err | adv std | tie share | CoT tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['reward_mean']:.3f} | {s['abs_err_mean']:.3f} | {s['adv_std']:.4f} | "
              f"{s['tie_share']:.2f} | {s['cot_tokens_mean']:.1f} |" for s in report["steps"]]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
