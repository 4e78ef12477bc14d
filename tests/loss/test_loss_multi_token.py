"""Multi-token score values in the loss (#29): ŷ = Σ_v v·p(v), p(v) the product of the conditional probabilities
of v's tokens, on the real scales of Mistral and SmolLM2 (1-10: "10" is two tokens) against an independent float64
autograd of that definition, and single-token scales (Llama-3 0-100) bitwise as before."""

from __future__ import annotations

import pytest
import torch

from tract_dist.data.score_scale import derive_score_scale
from tract_dist.loss import cot_raft_loss

H, N = 6, 24


def _problem(vocab: int, n_nodes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.4] = -100
    rows = torch.randperm(N, generator=g)[: 3 * n_nodes].view(3, n_nodes)  # 3 scores, distinct node rows
    targets[rows.flatten()] = -100
    targets[rows[0, -1]] = 7  # a node row may also be a CE row
    return hidden, weight, bias, targets, rows


def _brute(hidden, weight, bias, targets, rows, y, scale, *, lam, rail, u, ce_on):
    """The objective written out per value: walk each value's tokens from the root, one node row per prefix."""
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    node_of = {p: i for i, p in enumerate(scale.trie.nodes)}
    values = torch.tensor(scale.scores, dtype=torch.float64)
    tgt = targets.clone()
    if ce_on:
        for m in range(rows.shape[0]):
            seq = scale.sequences[int((y[m] - values).abs().argmin())]
            for i, tok in enumerate(seq):
                tgt[rows[m, node_of[seq[:i]]]] = tok
    valid = tgt != -100
    ce = -logp[valid].gather(1, tgt[valid][:, None]).sum() / valid.sum()
    sq, yhats = 0.0, []
    for m in range(rows.shape[0]):
        lpv = torch.stack([sum(logp[rows[m, node_of[seq[:i]]], tok] for i, tok in enumerate(seq))
                           for seq in scale.sequences])
        q = torch.softmax(lpv, 0) if rail else lpv.exp()
        yh = (q * values).sum()
        yhats.append(yh)
        sq = sq + u[m] * (yh - y[m]) ** 2
    return ce + lam * sq / rows.shape[0], torch.stack(yhats)


@pytest.mark.parametrize("name", ["mistral", "smollm2"])
def test_multi_token_scale_matches_float64_autograd(tokenizers, name):
    tok = tokenizers[name]
    scale = derive_score_scale(tok, "1-10")
    assert not scale.single_token and len(scale.trie.nodes) == 2  # the root and the node after "1"
    vocab = len(tok)
    hidden, weight, bias, targets, rows = _problem(vocab, scale.trie.num_nodes)
    y = torch.tensor([10.0, 1.0, 6.5], dtype=torch.float64)
    u = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    values = torch.tensor(scale.scores, dtype=torch.float64)
    for rail, ce_on in ((False, False), (True, True)):
        ref, yref = _brute(hidden, weight, bias, targets, rows, y, scale, lam=0.6, rail=rail, u=u, ce_on=ce_on)
        g_ref = torch.autograd.grad(ref, [hidden, weight, bias])
        for impl, kw in (("reference", {}), ("fused", {}), ("fused", {"chunk_size": 8, "vocab_shard": 16384})):
            out = cot_raft_loss(hidden, weight, targets, rows[:, 0], y, torch.empty(0, dtype=torch.long), values,
                                bias=bias, lam=0.6, rail_normalize=rail, ce_on_score_token=ce_on, mse_weights=u,
                                impl=impl, score_sequences=[list(s) for s in scale.sequences],
                                score_branch_rows=rows[:, 1:], **kw)
            grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
            where = f"{name} rail={rail} {impl} {kw}"
            torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12, msg=where)
            torch.testing.assert_close(out.yhat, yref.detach(), rtol=1e-12, atol=1e-12, msg=where)
            for a, b in zip(grads, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=where)


def test_single_token_scale_is_bitwise_todays_loss(tokenizers):
    """Llama-3 writes 0..100 as one token each: given as sequences, the scale takes the single-token path and
    every number is exactly what the score-token form gives (and matches the float64 definition)."""
    scale = derive_score_scale(tokenizers["llama3"], "0-100")
    assert scale.single_token and len(scale.scores) == 101
    vocab = max(s[0] for s in scale.sequences) + 1
    hidden, weight, bias, targets, rows = _problem(vocab, 1, seed=1)
    y = torch.tensor([0.0, 100.0, 37.5], dtype=torch.float64)
    values = torch.tensor(scale.scores, dtype=torch.float64)
    ids = torch.tensor([s[0] for s in scale.sequences])
    for impl in ("reference", "fused"):
        old = cot_raft_loss(hidden, weight, targets, rows[:, 0], y, ids, values, bias=bias, lam=0.01, impl=impl)
        new = cot_raft_loss(hidden, weight, targets, rows[:, 0], y, torch.empty(0, dtype=torch.long), values,
                            bias=bias, lam=0.01, impl=impl, score_sequences=[list(s) for s in scale.sequences])
        g_old = torch.autograd.grad(old.loss, [hidden, weight, bias])
        g_new = torch.autograd.grad(new.loss, [hidden, weight, bias])
        assert torch.equal(old.loss, new.loss) and torch.equal(old.yhat, new.yhat)
        assert all(torch.equal(a, b) for a, b in zip(g_old, g_new))
    ref, yref = _brute(hidden, weight, bias, targets, rows, y, scale, lam=0.01, rail=False,
                       u=torch.ones(3, dtype=torch.float64), ce_on=False)
    torch.testing.assert_close(new.yhat, yref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)


def test_multi_token_scale_needs_its_node_rows(tokenizers):
    scale = derive_score_scale(tokenizers["mistral"], "1-10")
    hidden, weight, bias, targets, rows = _problem(len(tokenizers["mistral"]), 2)
    with pytest.raises(ValueError, match="score_branch_rows of shape"):
        cot_raft_loss(hidden, weight, targets, rows[:, 0], torch.ones(3, dtype=torch.float64),
                      torch.empty(0, dtype=torch.long), torch.arange(1.0, 11.0, dtype=torch.float64),
                      impl="reference", score_sequences=[list(s) for s in scale.sequences])
