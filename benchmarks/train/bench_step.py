"""One training step of a Llama-3-shaped model with the fused CoT-RAFT head vs the reference head, side by side.

Plain PyTorch (no Ray, DeepSpeed or MLflow): the same random-initialised model, the same judge-shaped batch
(80 % prompt tokens, one score position per sequence) and AdamW, once with ``loss.impl=reference``
(materialised B x T x V logits) and once with ``fused``. Reports the median step time after warm-up,
tokens/s, peak memory, and how far the two heads' first losses and lm_head gradients are apart; on CUDA also
the model FLOP rate (6 x params x tokens / step time) against the bf16 matmul rate measured in the same run.

    python benchmarks/train/bench_step.py --preset gpu-1b --out results/step-NVIDIA-H200   # one GPU
    python benchmarks/train/bench_step.py --preset smoke --out /tmp/step                    # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tract_dist.loss import CoTRaftLossOptions  # noqa: E402
from tract_dist.models import CotRaftCausalLM, tiny_llama_config  # noqa: E402

PRESETS = {
    # random-llama-1b of tract_dist.train.model_init (Llama-3.2-1B shape), Llama-3 vocabulary, bf16.
    "gpu-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                   vocab=128256, batch=2, seq=2048, dtype="bf16", steps=6, warmup=2),
    "smoke": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  vocab=4099, batch=2, seq=128, dtype="fp32", steps=2, warmup=1),
}
PROMPT_FRACTION = 0.8
# Random weights: any five distinct ids stand for the score tokens (real runs take them from the tokenizer).
SCORE_TOKEN_IDS = (16, 17, 18, 19, 20)


def make_batch(p: dict, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = p["batch"], p["seq"]
    input_ids = torch.randint(0, p["vocab"], (b, t), generator=g)
    labels = input_ids.clone()
    labels[:, : int(PROMPT_FRACTION * t)] = -100
    score_pos = torch.full((b,), t - 3)  # the row before "<score> <eos>"
    labels[torch.arange(b), t - 2] = torch.tensor(SCORE_TOKEN_IDS)[torch.randint(0, 5, (b,), generator=g)]
    batch = dict(input_ids=input_ids, labels=labels, score_positions=score_pos,
                 score_targets=torch.rand(b, generator=g) * 4 + 1, attention_mask=torch.ones(b, t, dtype=torch.long))
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(base: torch.nn.Module, impl: str, batch: dict, p: dict, device: torch.device) -> dict:
    model = copy.deepcopy(base)
    options = CoTRaftLossOptions(SCORE_TOKEN_IDS, (1.0, 2.0, 3.0, 4.0, 5.0), impl=impl)
    wrapper = CotRaftCausalLM(model, options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, losses, head_grad = [], [], None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    for step in range(p["warmup"] + p["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        out = wrapper(**batch)
        out.loss.backward()
        if step == 0:
            head_grad = model.lm_head.weight.grad.detach().float().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= p["warmup"]:
            times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    row = dict(impl=impl, step_ms=statistics.median(times) * 1e3, losses=losses,
               tokens_per_s=batch["input_ids"].numel() / statistics.median(times))
    if device.type == "cuda":
        row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30
    del model, wrapper, opt
    return row | {"_head_grad": head_grad}


def bf16_matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def run(preset: str, device: torch.device, out: Path | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    p = PRESETS[preset]
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    shape = {k: p[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}
    config = tiny_llama_config(p["vocab"], tie=False, max_position_embeddings=p["seq"], attn_implementation="sdpa",
                               **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1B model's CPU init takes tens of seconds
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_params = sum(q.numel() for q in base.parameters())
    batch = make_batch(p, device)
    rows = [run_variant(base, impl, batch, p, device) for impl in ("reference", "fused")]
    ref, fused = rows
    g_ref, g_fused = ref.pop("_head_grad"), fused.pop("_head_grad")
    report = dict(
        preset=preset, device=str(device), dtype=p["dtype"], params=n_params, tokens=batch["input_ids"].numel(),
        rows=rows,
        fused_vs_reference_time=fused["step_ms"] / ref["step_ms"],
        first_loss_rel_diff=abs(fused["losses"][0] - ref["losses"][0]) / abs(ref["losses"][0]),
        head_grad_rel_diff=float((g_fused - g_ref).abs().max() / g_ref.abs().max()),
    )
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(device)
        report["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
        for r in rows:
            r["model_tflops"] = 6 * n_params * r["tokens_per_s"] / 1e12
            r["mfu_vs_measured_matmul"] = r["model_tflops"] / report["bf16_matmul_tflops"]
        report["peak_memory_ratio"] = fused["peak_gib"] / ref["peak_gib"]
    print(json.dumps(report, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-1b")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=None, help="output stem (.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    run(args.preset, device, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
