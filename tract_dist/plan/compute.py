"""FLOPs per training step and projected wall-clock per stage, at stated assumptions.

Training counts the usual 2 FLOPs per multiply-add: forward 2 x parameters per token, backward 4 x (input and
weight gradients), so 6 x P x tokens for full fine-tuning; with a frozen base and LoRA the weight-gradient half of
backward is skipped (4 x P) and the adapters add 6 x their parameters. Causal attention adds, per token and layer,
2 x q_dim x sequence length forward (QK^T and AV over half the keys on average), 3 x that with backward. The fused
loss head multiplies only the rows the loss reads. Activation checkpointing runs the forward again: reported as
hardware FLOPs beside the model FLOPs that MFU is defined on.

Time is FLOPs / (GPUs x peak x MFU) for compute-bound work (training, prefill). Decoding is bound by memory
bandwidth: each step reads every weight of a rank and the KV cache of each running sequence once, at a stated
fraction of peak bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from tract_dist.plan.memory import kv_bytes_per_token
from tract_dist.plan.shape import ModelShape


@dataclass(frozen=True)
class StepFlops:
    model: float  # what MFU counts
    hardware: float  # with activation recomputation

    def seconds(self, gpus: int, peak_tflops: float, mfu: float) -> float:
        return self.model / (gpus * peak_tflops * 1e12 * mfu)


def attention_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward attention FLOPs per token (causal, all layers)."""
    return 2.0 * shape.layers * shape.q_dim * seq_len


def train_step_flops(shape: ModelShape, *, tokens: int, seq_len: int, loss_rows: int, lora_params: int | None,
                     checkpointing: bool) -> StepFlops:
    """FLOPs of one optimizer step over ``tokens`` tokens (all workers), ``loss_rows`` of them read by the loss."""
    head = shape.vocab * shape.hidden
    body = shape.matmul_params - head  # decoder matmuls per token (MoE: the routed share)
    attn = attention_flops_per_token(shape, seq_len) * tokens
    if lora_params is None:
        model = 6.0 * body * tokens + 6.0 * head * loss_rows + 3 * attn
        recompute = 2.0 * body * tokens + attn
    else:
        model = 4.0 * body * tokens + 6.0 * lora_params * tokens + 4.0 * head * loss_rows + 3 * attn
        recompute = 2.0 * (body + lora_params) * tokens + attn
    return StepFlops(model, model + (recompute if checkpointing else 0.0))


@dataclass(frozen=True)
class DecodeRate:
    tokens_per_s: float  # one replica
    bound: str  # "memory bandwidth" or "compute"


def decode_rate(shape: ModelShape, *, tp: int, dtype_bytes: int, concurrency: int, mean_context: int,
                hbm_tb_s: float, hbm_efficiency: float, peak_tflops: float, mfu: float) -> DecodeRate:
    """Tokens/s of one replica decoding ``concurrency`` sequences: each step reads a rank's weights and every
    sequence's KV cache once (bandwidth bound) or does 2 x active parameters FLOPs per sequence (compute bound),
    whichever takes longer."""
    weights = shape.params * dtype_bytes / tp
    kv = concurrency * mean_context * kv_bytes_per_token(shape, dtype_bytes, tp)
    t_mem = (weights + kv) / (hbm_tb_s * 1e12 * hbm_efficiency)
    t_compute = (2.0 * shape.active_params * concurrency + concurrency * attention_flops_per_token(
        shape, mean_context)) / (tp * peak_tflops * 1e12 * mfu)
    step = max(t_mem, t_compute)
    return DecodeRate(concurrency / step, "memory bandwidth" if t_mem >= t_compute else "compute")


def prefill_seconds(shape: ModelShape, *, tokens: float, seq_len: int, gpus: int, peak_tflops: float,
                    mfu: float) -> float:
    """Compute-bound forward over ``tokens`` prompt tokens."""
    flops = (2.0 * shape.active_params + attention_flops_per_token(shape, seq_len)) * tokens
    return flops / (gpus * peak_tflops * 1e12 * mfu)
