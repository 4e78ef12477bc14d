"""A PROJECTION (not a measurement) of one REAL round at the paper's scale on 8 x H100, from published figures and
stated assumptions, printed part by part so every number can be checked and replaced by a measurement.

Scale (REAL's README defaults, FIDELITY.md): Qwen3-8B, prompt batch 256, 8 CoTs per prompt, CoTs up to 1,024
tokens, prompts up to 2,048 tokens; LoRA rank 64 on every linear layer. Layout assumed: colocated (the engines
and the ZeRO-3 workers share the 8 GPUs, one engine per GPU, vLLM's sleep mode frees its memory during the
update), which is REAL/verl's layout; tract-dist builds the HF-engine half of it today (see the README).

    python benchmarks/real/project_real_round.py --out benchmarks/results/real-projection-8xH100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# ---- published figures --------------------------------------------------------------------------------------
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity)
H100_HBM_BYTES_PER_S = 3.35e12  # same datasheet: 3.35 TB/s HBM3
H100_MEMORY_BYTES = 80e9
# Qwen3-8B config.json (huggingface.co/Qwen/Qwen3-8B): 36 layers, hidden 4096, MLP 12288, 32 query / 8 KV heads of
# dim 128, vocabulary 151,936, untied embeddings; 8.2 B parameters (its model card).
QWEN3_8B = dict(params=8.19e9, layers=36, hidden=4096, mlp=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
TRAIN_MFU = 0.40  # Llama 3 (Meta, "The Llama 3 Herd of Models", Table 4): 38-43 % BF16 MFU on H100; 8B LoRA/ZeRO-3
# at these lengths is assumed in that range (an assumption: replace by the GPU check's measured train_step MFU).
DECODE_BW_EFFICIENCY = 0.70  # assumption: share of HBM bandwidth a large-batch vLLM decode step sustains
PREFILL_MFU = 0.50  # assumption: prefill / scoring forwards are compute-bound matmuls

# ---- the round ----------------------------------------------------------------------------------------------
GPUS = 8
PROMPTS = 256
K = 8
PROMPT_TOKENS = 1000  # assumption: a Feedback Collection prompt in the Prometheus layout (instruction, response,
# reference, rubric) is about 700-1,300 tokens; REAL caps prompts at 2,048
COT_MEAN = 400  # assumption: mean sampled CoT length (TRACT/Prometheus feedback is a few hundred tokens)
COT_MAX = 1024  # REAL's max_response_length: the longest CoT sets the number of decode steps
LORA_R = 64


def project(mean_cot: int = COT_MEAN, updates: int = 1, beta: bool = False) -> dict[str, float]:
    m = QWEN3_8B
    n = PROMPTS * K
    per_gpu = n // GPUS
    flops_tok = 2 * m["params"]  # forward FLOPs per token (attention's share at these lengths ignored: ~10 %)
    kv_bytes_tok = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2  # K and V, bf16
    weights = 2 * m["params"]
    # rollout: decode steps bounded by HBM traffic (weights + the live KV cache: the prompt's once per prompt with
    # prefix caching, each CoT's own), the longest CoT sets the step count; mean live batch ~ per_gpu * mean/max
    live_kv = (PROMPTS // GPUS) * PROMPT_TOKENS * kv_bytes_tok + per_gpu * (mean_cot / 2) * kv_bytes_tok
    step_s = (weights + live_kv) / (H100_HBM_BYTES_PER_S * DECODE_BW_EFFICIENCY)
    steps_compute = per_gpu * flops_tok / (H100_BF16_DENSE_FLOPS * PREFILL_MFU)
    decode_s = COT_MAX * max(step_s, steps_compute)
    prefill_s = (PROMPTS // GPUS) * PROMPT_TOKENS * flops_tok / (H100_BF16_DENSE_FLOPS * PREFILL_MFU)
    # read-out + sampling log-probs: one forward per sample; with vLLM's prefix cache only CoT + phrase are new
    score_s = per_gpu * (mean_cot + 8) * flops_tok / (H100_BF16_DENSE_FLOPS * PREFILL_MFU)
    score_hf_s = per_gpu * (PROMPT_TOKENS + mean_cot + 8) * flops_tok / (H100_BF16_DENSE_FLOPS * PREFILL_MFU)
    # update: every sample's prompt + CoT through forward and backward; LoRA skips the frozen weights' gradients
    # (~4N FLOPs per token instead of 6N); each extra update re-runs it, plus one no-grad pass for the ratios
    tokens = per_gpu * (PROMPT_TOKENS + mean_cot)
    upd_full_s = tokens * 6 * m["params"] / (H100_BF16_DENSE_FLOPS * TRAIN_MFU)
    upd_lora_s = tokens * 4 * m["params"] / (H100_BF16_DENSE_FLOPS * TRAIN_MFU)
    nograd_s = tokens * flops_tok / (H100_BF16_DENSE_FLOPS * TRAIN_MFU)
    update_s = updates * upd_lora_s + (updates - 1) * nograd_s + (nograd_s if beta else 0.0)
    lin = [(m["hidden"], m["heads"] * m["head_dim"]), (m["hidden"], m["kv_heads"] * m["head_dim"]),
           (m["hidden"], m["kv_heads"] * m["head_dim"]), (m["heads"] * m["head_dim"], m["hidden"]),
           (m["hidden"], m["mlp"]), (m["hidden"], m["mlp"]), (m["mlp"], m["hidden"])]
    lora_params = m["layers"] * sum(LORA_R * (i + o) for i, o in lin)
    kv_peak = live_kv + per_gpu * (mean_cot / 2) * kv_bytes_tok  # all CoTs at their mean length at once
    return {
        "samples": n, "samples_per_gpu": per_gpu, "decode_step_ms": 1e3 * max(step_s, steps_compute),
        "decode_s": decode_s, "prefill_s": prefill_s, "score_vllm_prefix_cached_s": score_s,
        "score_hf_full_forward_s": score_hf_s, "rollout_s": decode_s + prefill_s + score_s,
        "update_lora_s": update_s, "update_full_ft_s": updates * upd_full_s,
        "round_s": decode_s + prefill_s + score_s + update_s,
        "rollout_samples_per_s": n / (decode_s + prefill_s + score_s), "update_samples_per_s": n / update_s,
        "lora_params_m": lora_params / 1e6, "lora_bf16_mb": 2 * lora_params / 2**20,
        "full_weights_gb": weights / 1e9, "kv_cache_gb_per_gpu": kv_peak / 1e9,
        "engine_memory_gb_per_gpu": (weights + kv_peak) / 1e9,
    }


def markdown(rows: dict[str, dict[str, float]]) -> str:
    base = rows["on-policy, beta 0"]
    out = ["# PROJECTION (not a measurement): one REAL round at the paper's scale on 8 x H100", "",
           "`benchmarks/real/project_real_round.py`. Qwen3-8B, 256 prompts x 8 CoTs (2,048 samples), CoTs up to "
           f"1,024 tokens (mean assumed {COT_MEAN}), prompts ~{PROMPT_TOKENS} tokens, LoRA r {LORA_R} on every "
           "linear layer, bf16, one engine per GPU colocated with the ZeRO-3 workers. Published figures: H100 SXM "
           "989 TFLOP/s dense BF16 and 3.35 TB/s HBM3 (NVIDIA datasheet), Qwen3-8B's config, 38-43 % training MFU "
           "on H100 (Llama 3 paper, Table 4). Assumptions: 40 % MFU for the update, 50 % for prefill and scoring, "
           "70 % of HBM bandwidth for decode, the mean CoT length. Attention FLOPs are left out (~10 % at these "
           "lengths). Replace each assumption by the GPU check's measurement (`gpu_check.py` stage `real_step`) "
           "when a GPU is lent.", "",
           "| part | seconds | note |", "|---|---|---|",
           f"| prefill (prompts once, prefix-cached for the 8 CoTs) | {base['prefill_s']:.1f} | compute-bound |",
           f"| decode, 1,024 steps x {base['decode_step_ms']:.1f} ms | {base['decode_s']:.1f} | HBM-bound: "
           f"16.4 GB weights + the live KV cache per step |",
           f"| read-out + sampling log-probs (vLLM, prefix cache) | {base['score_vllm_prefix_cached_s']:.1f} | "
           f"the HF engine re-reads each prompt: {base['score_hf_full_forward_s']:.1f} s |",
           f"| rollout | {base['rollout_s']:.1f} | {base['rollout_samples_per_s']:.0f} samples/s |",
           f"| update, LoRA (fwd + bwd, 1 step) | {base['update_lora_s']:.1f} | "
           f"{base['update_samples_per_s']:.0f} samples/s; full fine-tuning {base['update_full_ft_s']:.1f} s |",
           f"| LoRA hand-over ({base['lora_params_m']:.0f} M params, {base['lora_bf16_mb']:.0f} MB bf16) | < 1 | "
           f"vs {base['full_weights_gb']:.1f} GB of full weights per engine |",
           f"| **round** | **{base['round_s']:.0f}** | rollout {100 * base['rollout_s'] / base['round_s']:.0f} % |",
           "", "| variant | update s | round s |", "|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['update_lora_s']:.1f} | {r['round_s']:.0f} |")
    out += ["", f"Engine memory per GPU: {base['engine_memory_gb_per_gpu']:.0f} GB (weights + a KV cache of "
            f"{base['kv_cache_gb_per_gpu']:.0f} GB at the mean CoT length) of 80 GB: colocating needs vLLM's sleep "
            "mode (or a smaller gpu_memory_utilization) while ZeRO-3 holds its shards, activations and optimizer "
            "state; a split layout (e.g. 4 GPUs rolling out, 4 training) halves each side's rate and removes the "
            "memory question.", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = {"on-policy, beta 0": project(), "on-policy, beta > 0 (reference pass)": project(beta=True),
            "3 updates per round (REAL's real_epochs=3), clipped ratios": project(updates=3),
            "mean CoT 800 tokens": project(mean_cot=800)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
