"""bf16 errors of the fused loss against a float64 reference, per output, next to the naive bf16 loss's.

Inputs are bf16; the reference is the materialised loss in float64 on exactly those (upcast) values, so
the only errors measured are the implementations' own roundings. The yardstick is the HF-style loss that
every bf16 training run uses (bf16 logits -> float -> cross entropy, autograd), whose errors come from the
same sources: one bf16 rounding of the logits, of dlogits and of the output gradients.

Tolerances: bf16 keeps 8 significant bits, so a logit z is rounded by up to 2^-9 |z|. Logits here look like
an LM's (std ~4, max ~22), and p_j = exp(z_j - lse) inherits that rounding as a relative error, so a
gradient entry at the largest logits carries up to 2^-9 max|z|, plus one rounding of dlogits and one of the
output gradient (2^-9 each): ``GRAD_TOL = 2^-9 (max|z| + 2)`` in the max-norm relative sense (~4.7e-2 here).
The loss averages those roundings over rows and stays far below 1e-2. The fused path must also stay within
1.5x the naive path's error (+1e-3 for noise) on every output: it may not be less accurate than what it
replaces. Both fused variants are checked: one chunk (the weight gradient is one bf16 matmul) and many
chunks (fp32 accumulation across chunks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import make_problem, rel_err

from tract_dist.loss import cot_raft_loss

LOSS_TOL = 1e-2


def _naive_bf16(p):
    """What an HF-style bf16 run computes: bf16 logits, upcast, F.cross_entropy + expected-score MSE."""
    logits = (p.hidden @ p.weight.T).float()
    ce = F.cross_entropy(logits, p.targets, ignore_index=-100, reduction="sum") / (p.targets != -100).sum()
    probs = torch.softmax(logits[p.score_rows], dim=-1)[:, p.score_token_ids]
    mse = ((probs @ p.score_values.float() - p.score_targets) ** 2).mean()
    return ce + mse


def _errors(loss, grads, ref_loss, ref_grads) -> dict[str, float]:
    return {"loss": rel_err(loss, ref_loss), "grad_hidden": rel_err(grads[0], ref_grads[0]),
            "grad_weight": rel_err(grads[1], ref_grads[1])}


@pytest.mark.parametrize("chunk_size", [None, 64], ids=["one-chunk", "many-chunks"])
def test_bf16_errors_per_output(chunk_size, record_property):
    p = make_problem(n=1024, h=64, v=8191, dtype=torch.bfloat16, ignore_frac=0.8, bias=False, scale=0.7, seed=41)
    hd, wd = p.hidden.detach().double().requires_grad_(), p.weight.detach().double().requires_grad_()
    ref = cot_raft_loss(hd, wd, p.targets, p.score_rows, p.score_targets.double(), p.score_token_ids,
                        p.score_values.double(), impl="reference")
    ref_grads = torch.autograd.grad(ref.loss, (hd, wd))

    naive_loss = _naive_bf16(p)
    naive = _errors(naive_loss, torch.autograd.grad(naive_loss, (p.hidden, p.weight)), ref.loss, ref_grads)
    out = cot_raft_loss(*p.args(), chunk_size=chunk_size)
    fused = _errors(out.loss, torch.autograd.grad(out.loss, (p.hidden, p.weight)), ref.loss, ref_grads)

    for name in fused:
        record_property(f"bf16_{name}_fused", fused[name])
        record_property(f"bf16_{name}_naive", naive[name])
    print(f"\nbf16 vs float64 ({'one chunk' if chunk_size is None else f'chunks of {chunk_size}'}): "
          + ", ".join(f"{k} fused {fused[k]:.2e} / naive {naive[k]:.2e}" for k in fused))
    assert fused["loss"] <= LOSS_TOL and naive["loss"] <= LOSS_TOL
    z_max = float((hd.detach() @ wd.detach().T).abs().max())
    grad_tol = 2**-9 * (z_max + 2)
    record_property("bf16_grad_tolerance", grad_tol)
    for name in ("grad_hidden", "grad_weight"):
        assert fused[name] <= grad_tol, (name, fused, naive, grad_tol)
    for name in fused:
        assert fused[name] <= 1.5 * naive[name] + 1e-3, (name, fused, naive)
