"""REAL's loss on sampled CoTs as per-token weights on the fused CoT-RAFT loss.

The objective for a prompt x with gold score y is J(θ) = E_{c~π_θ}[-(ŷ_θ(x, c) - y)^2]. Its gradient has two
parts (REAL, arXiv 2603.17145): CoT exploration E[r(c) ∇log π_θ(c|x)], estimated from k samples with the RLOO
advantages A_i (:mod:`.advantages`), and prediction refinement E[-∇(ŷ_θ(x, c) - y)^2] by backpropagation through
ŷ. As one loss over the round's N CoT tokens and M sampled sequences (token-mean, REAL's ``loss_agg_mode``):

    L = Σ_i Σ_{t∈c_i} w_it · (-log π_θ(c_it | ...)) / N   +   λ · Σ_i (ŷ_i - y_i)^2 / M

which is exactly the fused CoT-RAFT loss with a CE weight per token and its usual regression term, so REAL needs
no loss kernel of its own. The token weights w make ∇L the gradient of the full per-token objective

    Σ_t [ -min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i) + β k3_t ] / N + λ Σ_i (ŷ_i - y_i)^2 / M,
    ρ_t = π_θ(c_t) / π_old(c_t),   k3_t = π_ref/π_θ - log(π_ref/π_θ) - 1   (GRPO's KL estimator),

because ∇(ρ A) = ρ A ∇log π, ∇k3 = (1 - π_ref/π_θ) ∇log π, and a clipped token has no gradient:
    w_t = A_i ρ_t [t not clipped] + β (π_ref/π_θ - 1).
On-policy (one update per round, no KL) ρ ≡ 1 and w_t = A_i: the plain RLOO policy gradient. Every quantity in w
is computed without gradient (the current log-probs from a no-grad pass, :meth:`CotRaftCausalLM.forward` with
``token_logprobs=True``); the value logged as the surrogate is the objective above, not the weighted CE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """GRPO's k3 estimator of KL(π_θ || π_ref) per token: e^(ref - logp) - (ref - logp) - 1 (>= 0).

    verl clamps its argument to [-20, 20] and the result to [-10, 10]; not here, so that the gradient weights
    stay exact (a policy that far from its reference has a problem the clamp would hide)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class TokenWeights:
    """Per-label-token CE weights (B, T) and the summed diagnostics of one micro-batch (device scalars)."""

    weights: torch.Tensor
    surrogate: torch.Tensor  # Σ_t -min(ρA, clip(ρ)A) over the CoT tokens
    kl: torch.Tensor  # Σ_t k3_t (0 without a reference)
    clipped: torch.Tensor  # tokens whose ratio was clipped
    ratio_dev: torch.Tensor  # Σ_t |ρ_t - 1|


def surrogate_token_weights(adv: torch.Tensor, mask: torch.Tensor, *, logp: torch.Tensor | None = None,
                            old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                            clip_eps: float = 0.2, beta: float = 0.0) -> TokenWeights:
    """Token weights of REAL's loss (module docstring). ``adv`` (B,) advantages of the sequences, ``mask`` (B, T)
    the CoT tokens (label positions); ``logp`` (B, T) the current policy's log-probs of the labels (needed with
    ``old_logp`` or ``beta``), ``old_logp`` the sampling policy's (None: on-policy, ρ ≡ 1, no clipping),
    ``ref_logp`` the reference policy's (needed when ``beta`` > 0)."""
    m = mask.to(adv.dtype if adv.is_floating_point() else torch.float64)
    a = adv.to(m.dtype)[:, None].expand_as(m)
    zero = m.new_zeros(())
    if old_logp is None:
        w_pg = a * m
        surrogate, clipped, ratio_dev = -(w_pg.sum()), zero, zero
    else:
        if logp is None:
            raise ValueError("importance ratios need the current log-probs (logp)")
        ratio = torch.exp((logp - old_logp).to(m.dtype)) * m
        unclipped = torch.where(a >= 0, ratio <= 1 + clip_eps, ratio >= 1 - clip_eps) & (m > 0)
        w_pg = a * ratio * unclipped
        obj = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
        surrogate = -(obj * m).sum()
        clipped = ((~unclipped) & (m > 0) & (a != 0)).sum().to(m.dtype)
        ratio_dev = ((ratio - 1).abs() * m).sum()
    kl = zero
    w = w_pg
    if beta > 0:
        if logp is None or ref_logp is None:
            raise ValueError("the KL term needs the current and the reference log-probs")
        d = (ref_logp - logp).to(m.dtype)
        kl = (k3_kl(logp.to(m.dtype), ref_logp.to(m.dtype)) * m).sum()
        w = w + beta * (torch.exp(d) - 1) * m
    return TokenWeights(weights=w, surrogate=surrogate, kl=kl, clipped=clipped, ratio_dev=ratio_dev)
