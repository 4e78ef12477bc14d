"""Step statistics of the training recipe: named sums, one all-reduce per step, the metrics it logs.

Every micro-batch adds its values to one float64 device tensor (no host sync inside the step); the step
reads them with one all-reduce and one transfer. The names of the logged metrics (metrics.jsonl, MLflow,
the console) are defined here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

# Dense bf16 peak of common cards, for MFU (FLOP/s per GPU).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's sums over its micro-batches and all ranks."""

    loss: float  # sum over ranks of each rank's loss; each is world x its share (denominators / world)
    ce: float  # the same for the CE term
    mse: float  # the same for the regression term (not multiplied by lam)
    abs_err: float  # sum of |yhat - y| over the step's scored sequences
    tokens: float  # real (non-pad) tokens of the step (for throughput)
    slots: float  # token slots the forwards computed (tokens + padding)


_FIELDS = tuple(f.name for f in fields(StepStats))


class StepAccumulator:
    """Adds micro-batch values on the device; :meth:`reduce` all-reduces them once per step."""

    def __init__(self, device: torch.device) -> None:
        self._sums = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)

    def add(self, out: Any, batch: dict[str, torch.Tensor]) -> None:
        """``out``: the model's CotRaftOutput (loss, ce, mse, yhat) for ``batch`` (padded or packed)."""
        from tract_dist.train.batching import batch_tokens

        values = {"loss": out.loss.detach(), "ce": out.ce, "mse": out.mse, "abs_err": _abs_err_sum(out.yhat, batch),
                  "tokens": batch_tokens(batch),
                  "slots": torch.tensor(batch["input_ids"].numel(), device=self._sums.device)}
        self._sums += torch.stack([values[k] for k in _FIELDS]).double()

    def reduce(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> StepStats:
        """Sum over ranks with the strategy's collective (``DeepSpeedStrategy.sum_``: every rank calls it) and
        read on the host."""
        return StepStats(*sum_over_ranks(self._sums).tolist())


def _abs_err_sum(yhat: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of |yhat - y| over the scored examples (yhat has one entry per example with a score position),
    as a device scalar: the step reads all its statistics with one transfer."""
    gold = batch["score_targets"][batch["score_positions"] >= 0]
    return (yhat.detach().double() - gold.double()).abs().sum()


class ThroughputWindow:
    """Tokens per second over the last few steps (the first step includes warm-up)."""

    def __init__(self, size: int = 10) -> None:
        self.items: list[tuple[float, float]] = []
        self.size = size

    def add(self, tokens: float, seconds: float) -> None:
        self.items = (self.items + [(tokens, seconds)])[-self.size:]

    def rate(self) -> float:
        tok, sec = (sum(x) for x in zip(*self.items))
        return tok / sec if sec > 0 else 0.0


def step_metrics(stats: StepStats, *, world_size: int, sequences: float, lr: float, grad_norm: float,
                 window: ThroughputWindow, epoch: float, n_params: int, use_cuda: bool,
                 lam: float | None = None) -> dict[str, float]:
    """The metrics of a step, by the names metrics.jsonl, MLflow and the console use (``lam``: the λ in force,
    which ``loss.lam_warmup_steps`` ramps)."""
    metrics = {
        "loss": stats.loss / world_size, "ce": stats.ce / world_size, "mse": stats.mse / world_size,
        "mae": stats.abs_err / sequences, "lr": lr, **({"lam": lam} if lam is not None else {}),
        "grad_norm": grad_norm, "tokens_per_s": window.rate(),
        "tokens_per_s_per_worker": window.rate() / world_size, "epoch": epoch,
        "pad_fraction": 1.0 - stats.tokens / stats.slots if stats.slots else 0.0,
    }
    if use_cuda:
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        metrics["mfu"] = mfu(n_params, window.rate() / world_size)
    return metrics


def mfu(n_params: int, tokens_per_s_per_gpu: float) -> float:
    """Model FLOPs utilisation with the 6N FLOPs/token estimate (attention FLOPs ignored)."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s_per_gpu / peak if peak else float("nan")

