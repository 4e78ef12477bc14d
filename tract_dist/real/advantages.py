"""Rewards and leave-one-out advantages of REAL (arXiv 2603.17145; github.com/YasminZhang/REAL).

For a prompt with gold score y and k sampled CoTs c_1..c_k, each read out by RAIL as ŷ_i:
    r_i = -(ŷ_i - y)^2,      A_i = r_i - mean_{j != i} r_j   (RLOO: Kool et al. 2019; Ahmadian et al. 2024)
The leave-one-out baseline does not depend on c_i, so E[A_i ∇log π(c_i)] = E[r_i ∇log π(c_i)] (unbiased), and
the A_i of a prompt sum to zero exactly (Σ_i r_i - Σ_i (S - r_i)/(k-1) = S - (kS - S)/(k-1) = 0).

REAL's official actor (verl/workers/actor/real_actor.py) then divides each prompt's A by its population std
(+1e-8) and clamps to [-1, 1] when ``normalize_advantages`` (set in its 32B script): ``advantage_norm="std"``
and ``advantage_clip=1.0`` here reproduce that; the defaults keep the unbiased estimator of the issue.
"""

from __future__ import annotations

from typing import Literal

import torch

STD_EPS = 1e-8  # REAL's own epsilon on the per-prompt std


def regression_rewards(yhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """r = -(ŷ - y)^2, elementwise (``y`` broadcasts: (P, 1) against (P, k))."""
    return -(yhat - y) ** 2


def rloo_advantages(rewards: torch.Tensor, *, norm: Literal["none", "std"] = "none",
                    clip: float | None = None) -> torch.Tensor:
    """(P, k) rewards -> (P, k) leave-one-out advantages A_i = r_i - mean_{j != i} r_j (k >= 2).

    ``norm="std"`` divides each prompt's advantages by their population std + 1e-8 (REAL's option; a prompt whose
    samples all tie keeps zeros); ``clip`` clamps them to [-clip, clip] afterwards."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, k >= 2), got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    total = rewards.sum(1, keepdim=True)
    adv = rewards - (total - rewards) / (k - 1)
    if norm == "std":
        adv = adv / (adv.std(1, unbiased=False, keepdim=True) + STD_EPS)
    elif norm != "none":
        raise ValueError(f"unknown advantage norm {norm!r}: none or std")
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def tied_prompts(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """(P,) bool: prompts whose k rewards all tie (their advantages are all zero: no policy-gradient signal)."""
    return (rewards.max(1).values - rewards.min(1).values) <= atol
