"""The relative-grading objective (#29 item 2) is the existing CoT-RAFT loss on the two-value verdict scale: CE on the
feedback tokens + λ·(p(A) − y)², p(A) = p("A") / (p("A") + p("B")) at the verdict position. Checked on real
SmolLM2 token ids (three encoded pairs, y = 1, 0 and a soft 0.7) against an independent float64 autograd of that
definition over the full vocabulary, for the reference and the fused implementations."""

from __future__ import annotations

import pytest
import torch

from tract_dist.data.encode import EncodeOptions
from tract_dist.data.relative import REL_SYSTEM_PROMPT, PairExample, derive_verdict_scale, encode_pair
from tract_dist.loss import CoTRaftLossOptions, cot_raft_loss_with_options
from tract_dist.protocol import IGNORE_INDEX

H = 6


def _batch(tok):
    scale = derive_verdict_scale(tok)
    opts = EncodeOptions(max_length=4096, system_prompt=REL_SYSTEM_PROMPT)
    pairs = [PairExample(id=str(i), instruction=f"Question {i}?", response_a=f"answer {i}", response_b="no idea",
                         rubric="Is it helpful?", preference=y, feedback=f"Response A tries; B does not ({i}).")
             for i, y in enumerate((1.0, 0.0, 0.7))]
    encs = [encode_pair(tok, p, scale, opts) for p in pairs]
    targets, rows, offset = [], [], 0
    for e in encs:  # HF alignment: row t predicts token t + 1; the last row of a sequence predicts nothing
        targets += e.labels[1:] + [IGNORE_INDEX]
        rows.append(offset + e.score_position)
        offset += len(e.input_ids)
    # Only the rows the loss reads (CE targets and verdict positions): the prompt rows are ignored by both sides,
    # and leaving them out keeps the float64 (rows x vocabulary) reference small.
    targets = torch.tensor(targets)
    active = sorted(set(torch.nonzero(targets != IGNORE_INDEX).flatten().tolist()) | set(rows))
    at = {r: i for i, r in enumerate(active)}
    return (scale, encs, targets[active], torch.tensor([at[r] for r in rows]),
            torch.tensor([e.score for e in encs], dtype=torch.float64))


def test_relative_loss_matches_float64_autograd(tokenizers):
    tok = tokenizers["smollm2"]
    scale, encs, targets, rows, y = _batch(tok)
    a, b = (s[0] for s in scale.sequences)
    assert all(targets[r] == IGNORE_INDEX for r in rows)  # the verdict is learnt through the regression term only
    g = torch.Generator().manual_seed(0)
    n, vocab = targets.numel(), len(tok)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, H, generator=g, dtype=torch.float64, requires_grad=True)
    lam = 0.8

    logits = hidden @ weight.T
    logp = torch.log_softmax(logits, -1)
    valid = targets != IGNORE_INDEX
    ce = -logp[valid].gather(1, targets[valid][:, None]).sum() / valid.sum()
    p = logp[rows].exp()
    p_a = p[:, a] / (p[:, a] + p[:, b])
    ref = ce + lam * ((p_a - y) ** 2).mean()
    g_ref = torch.autograd.grad(ref, [hidden, weight])

    for impl, kw in (("reference", {}), ("fused", {"chunk_size": 16})):
        opts = CoTRaftLossOptions([s[0] for s in scale.sequences], scale.scores, lam=lam,
                                  rail_normalize=True, impl=impl, **kw)
        out = cot_raft_loss_with_options(hidden, weight, targets, rows, y, opts)
        grads = torch.autograd.grad(out.loss, [hidden, weight])
        torch.testing.assert_close(out.yhat, p_a.detach(), rtol=1e-12, atol=1e-14, msg=impl)
        torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12, msg=impl)
        for got, want in zip(grads, g_ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=f"{impl} {kw}")
    assert out.n_score_rows == 3 and out.n_ce_tokens == int(valid.sum())
    assert p_a.min() > 0 and p_a.max() < 1 and float((p[:, a] + p[:, b]).detach().max()) < 1e-2  # renormalisation matters


@pytest.mark.parametrize("y", [1.0, 0.0, 0.7])
def test_regression_term_pulls_p_a_toward_the_preference(y):
    """One gradient step on the verdict logits moves p(A) toward y (the sign of the regression gradient)."""
    z = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64, requires_grad=True)  # logits of A, B, another
    opts = CoTRaftLossOptions([0, 1], [1, 0], lam=1.0, rail_normalize=True, impl="reference")
    eye = torch.eye(3, dtype=torch.float64)
    out = cot_raft_loss_with_options(z, eye, torch.tensor([IGNORE_INDEX]), torch.tensor([0]),
                                     torch.tensor([y], dtype=torch.float64), opts)
    (gz,) = torch.autograd.grad(out.loss, [z])
    p_before = float(out.yhat)
    zz = (z - 0.5 * gz).detach()
    p_after = float(torch.softmax(zz[0, :2], 0)[0])
    assert abs(p_after - y) < abs(p_before - y)
