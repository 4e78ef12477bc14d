"""Independent numeric check with Mistral-7B's score token ids, computed by hand with ``math``.

The lm_head is built so the logits are explicit: with hidden = (1, x) and weight rows (l_j, 0),
z_j = l_j. All 32000 logits are 0 except the five score tokens, so the softmax, yhat and the
gradient w.r.t. hidden[0] (= sum_j dL/dz_j * l_j) have closed forms in plain Python floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from tract_dist.loss import cot_raft_loss

VOCAB = 32000
MISTRAL_DIGITS = [28740, 28750, 28770, 28781, 28782]  # "1".."5" in Mistral-7B's SentencePiece vocab
LOGITS = [2.0, 5.0, 9.0, 11.0, 8.0]
OTHER_TARGET = 1000  # a CoT token whose logit is 0


def _problem():
    weight = torch.zeros(VOCAB, 2, dtype=torch.float64)
    for t, l in zip(MISTRAL_DIGITS, LOGITS):
        weight[t, 0] = l
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weight.requires_grad_()
    targets = torch.tensor([OTHER_TARGET, -100])  # row 0: CoT token, row 1: score row
    return hidden, weight, targets


def _hand(y: float, rail: bool, lam: float):
    e = [math.exp(l) for l in LOGITS]
    z_sum = (VOCAB - 5) * 1.0 + sum(e)  # exp(0) for every other token
    p = [x / z_sum for x in e]
    q = [x / sum(e) for x in e] if rail else p
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    yhat = sum(v * w for v, w in zip(vals, q))
    ce = math.log(z_sum)  # -log p(OTHER_TARGET) with z = 0
    mse = (yhat - y) ** 2
    # d loss / d hidden[1, 0] (score row): MSE part only (row 1 has no CE target).
    # full:  dL/dz_j = 2 lam (yhat - y) p_j (v(j) - yhat); only score tokens have l_j != 0.
    # rail:  dL/dz_{t_k} = 2 lam (yhat - y) q_k (v_k - yhat).
    g = 2 * lam * (yhat - y)
    grad_h10 = sum(g * w * (v - yhat) * l for w, v, l in zip(q, vals, LOGITS))
    # d loss / d hidden[0, 0] (CE row): sum_j (p_j - [j == target]) l_j, target logit l = 0.
    grad_h00 = sum(w * l for w, l in zip(p, LOGITS))
    return yhat, ce, mse, grad_h00, grad_h10


@pytest.mark.parametrize("rail", [False, True])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_mistral_score_tokens_by_hand(impl, rail):
    hidden, weight, targets = _problem()
    y, lam = 3.3, 0.7
    out = cot_raft_loss(
        hidden, weight, targets, torch.tensor([1]), torch.tensor([y], dtype=torch.float64),
        torch.tensor(MISTRAL_DIGITS), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64),
        lam=lam, rail_normalize=rail, impl=impl, chunk_size=1, vocab_shard=4096,
    )
    yhat, ce, mse, g00, g10 = _hand(y, rail, lam)
    assert 2.0 < yhat < 5.0  # hand-picked logits: the other 31995 tokens hold ~1/3 of the mass
    assert float(out.yhat[0]) == pytest.approx(yhat, rel=1e-13)
    assert float(out.ce) == pytest.approx(ce, rel=1e-13)
    assert float(out.mse) == pytest.approx(mse, rel=1e-12)
    assert out.loss.item() == pytest.approx(ce + lam * mse, rel=1e-13)
    (gh,) = torch.autograd.grad(out.loss, [hidden])
    assert float(gh[0, 0]) == pytest.approx(g00, rel=1e-12)
    assert float(gh[1, 0]) == pytest.approx(g10, rel=1e-12)
    assert float(gh[0, 1]) == 0.0 and float(gh[1, 1]) == 0.0
