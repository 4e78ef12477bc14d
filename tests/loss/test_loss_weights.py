"""Per-sequence weights in the CoT-RAFT loss (#24): against float64 autograd of the weighted objective written
out independently, on real token ids; weights of 1 give exactly the unweighted numbers.

The objective, per sequence s of the global batch (D_ce = CE targets of the batch, D_mse = its sequences):
    loss = sum_s w_s * sum_{t in CE(s)} -log p(x_t) / D_ce  +  lam * sum_s u_s * (yhat_s - y_s)^2 / D_mse
with w the CE weights and u the squared-error weights (signed allowed). Here it is computed from the full
(B, T, V) logits of a padded batch, row by row, with no code of the loss package; the batches are real Vicuna
Bench records encoded by the project's encoder with the real Mistral-7B tokenizer (its ids, score tokens, EOS).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import make_problem, rel_err

from tract_dist.data.encode import EncodeOptions, encode_example
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_tokens import derive_score_tokens
from tract_dist.loss import CoTRaftLossOptions, cot_raft_loss
from tract_dist.loss.fused import FusedCoTRaftFunction
from tract_dist.models import select_loss_rows
from tract_dist.train.data import collate

PROMPT_TAIL = 5  # masked prompt tokens kept before each CoT (the cropped ones change nothing)
WORDS = [6, 11, 3, 17]  # CoT lengths in words: unequal CE-token counts per sequence
WEIGHTS = [1.7, -0.6, 0.0, 0.35]  # signed, one zero
MSE_WEIGHTS = [0.25, 2.0, 1.1, -0.4]


@pytest.fixture(scope="module")
def batch_and_tokens(tokenizers, quickstart_examples):
    tok = tokenizers["mistral"]
    st = derive_score_tokens(tok)
    rows = []
    for ex, n in zip(quickstart_examples[:4], WORDS):
        ex = JudgeExample(**{**ex.to_dict(), "feedback": " ".join(ex.feedback.split()[:n])})
        enc = encode_example(tok, ex, st, EncodeOptions(max_length=4096))
        first = next(i for i, lab in enumerate(enc.labels) if lab != -100)
        start = max(0, first - PROMPT_TAIL)
        row = enc.to_dict()
        row["input_ids"], row["labels"] = enc.input_ids[start:], enc.labels[start:]
        row["score_position"] = enc.score_position - start
        rows.append(row)
    return collate(rows, tok.pad_token_id if tok.pad_token_id is not None else 0), st, len(tok)


def _leaves(batch, vocab: int, h: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*batch["input_ids"].shape, h, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(vocab, h, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    return hidden, weight


def independent_objective(hidden, weight, batch, st, w, u, lam, rail_normalize=False):
    """The weighted objective from full logits, sequence by sequence (float64 autograd)."""
    labels, pos, y = batch["labels"], batch["score_positions"], batch["score_targets"].double()
    ids, values = torch.tensor(st.token_ids), torch.tensor(st.scores, dtype=torch.float64)
    logits = hidden @ weight.T  # (B, T, V)
    d_ce = int((labels[:, 1:] != -100).sum())
    d_mse = labels.shape[0]
    ce = hidden.new_zeros(())
    mse = hidden.new_zeros(())
    for s in range(labels.shape[0]):
        tgt = labels[s, 1:].clone()
        tgt[pos[s]] = -100  # the row predicting the score: regression only
        nll = F.cross_entropy(logits[s, :-1], tgt, ignore_index=-100, reduction="sum")
        ce = ce + w[s] * nll
        z = logits[s, pos[s]]
        p = torch.softmax(z[ids], -1) if rail_normalize else torch.softmax(z, -1)[ids]
        mse = mse + u[s] * (p @ values - y[s]) ** 2
    return ce / d_ce + lam * mse / d_mse, ce / d_ce, mse / d_mse


def _ours(hidden, weight, batch, st, impl, lam, ce_w=None, mse_w=None, **kw):
    rows = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"].double(),
                            ce_weights=ce_w, mse_weights=mse_w)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.row_index)
    return cot_raft_loss(flat, weight, rows.targets, rows.score_rows, rows.score_targets, torch.tensor(st.token_ids),
                         torch.tensor(st.scores, dtype=torch.float64), lam=lam, impl=impl, ce_weights=rows.ce_weights,
                         mse_weights=rows.mse_weights, ce_denominator=int((batch["labels"][:, 1:] != -100).sum()),
                         mse_denominator=batch["labels"].shape[0], **kw)


CASES = [
    dict(impl="reference"),
    dict(impl="fused"),  # the CPU one-pass path
    dict(impl="fused", rail_normalize=True, chunk_size=40, vocab_shard=12000),  # two passes, 3 shards x 2 chunks
]


@pytest.mark.parametrize("case", CASES, ids=["reference", "fused", "fused-tiles-rail"])
def test_weighted_loss_matches_float64_autograd_on_real_tokens(batch_and_tokens, case):
    batch, st, vocab = batch_and_tokens
    hidden, weight = _leaves(batch, vocab)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    u = torch.tensor(MSE_WEIGHTS, dtype=torch.float64)
    lam = 0.7
    rail = case.get("rail_normalize", False)
    want, want_ce, want_mse = independent_objective(hidden, weight, batch, st, w, u, lam, rail)
    g_want = torch.autograd.grad(want, (hidden, weight))
    out = _ours(hidden, weight, batch, st, ce_w=w, mse_w=u, lam=lam, **case)
    g = torch.autograd.grad(out.loss, (hidden, weight))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-13)
    assert out.ce.item() == pytest.approx(want_ce.item(), rel=1e-12, abs=1e-13)
    assert out.mse.item() == pytest.approx(want_mse.item(), rel=1e-12, abs=1e-13)
    for a, b in zip(g, g_want):
        assert rel_err(a, b) <= 1e-11
    # the weights matter: the unweighted loss is a different number, and a zero weight removes a sequence's CE
    plain = _ours(hidden, weight, batch, st, lam=lam, **case)
    assert abs(plain.loss.item() - out.loss.item()) > 1e-3 * abs(plain.loss.item())


@pytest.mark.parametrize("which", ["ce", "mse"])
def test_weights_on_one_term_leave_the_other_alone(batch_and_tokens, which):
    batch, st, vocab = batch_and_tokens
    hidden, weight = _leaves(batch, vocab, seed=1)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    kw = {"ce_w": w} if which == "ce" else {"mse_w": w}
    want, want_ce, want_mse = independent_objective(hidden, weight, batch, st, w if which == "ce" else ones,
                                                    w if which == "mse" else ones, 0.3)
    out = _ours(hidden, weight, batch, st, "fused", 0.3, **kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert (out.ce.item(), out.mse.item()) == pytest.approx((want_ce.item(), want_mse.item()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(impl="reference"), dict(impl="fused"), dict(impl="fused", chunk_size=9, vocab_shard=32)],
                         ids=["reference", "fused-one-pass", "fused-two-pass"])
def test_weights_of_one_give_exactly_the_unweighted_numbers(dtype, kw):
    p = make_problem(n=40, h=12, v=97, dtype=dtype, seed=5)
    kw = dict(bias=p.bias, rail_normalize=True, ce_on_score_token=True, lam=0.4, **kw)
    base = cot_raft_loss(*p.args(), **kw)
    g_base = torch.autograd.grad(base.loss, p.leaves())
    ones = cot_raft_loss(*p.args(), ce_weights=torch.ones(40, dtype=torch.float64),
                         mse_weights=torch.ones(p.score_rows.numel()), **kw)
    g_ones = torch.autograd.grad(ones.loss, p.leaves())
    for a, b in zip((ones.loss, ones.ce, ones.mse, ones.yhat, *g_ones), (base.loss, base.ce, base.mse, base.yhat, *g_base)):
        assert torch.equal(a, b)  # bitwise: x 1.0 is exact and the arithmetic is otherwise the same


def test_gradcheck_fused_with_weights():
    p = make_problem(n=9, h=4, v=13, dtype=torch.float64, score_rows=[2, 7], n_scale=4, seed=2)
    options = CoTRaftLossOptions(p.score_token_ids, p.score_values, lam=0.8, chunk_size=4, vocab_shard=5)
    w = torch.linspace(-1.0, 2.0, 9, dtype=torch.float64)
    u = torch.tensor([0.3, -1.5], dtype=torch.float64)

    def f(hidden, weight, bias):
        return FusedCoTRaftFunction.apply(hidden, weight, bias, p.targets, p.score_rows, p.score_targets, options,
                                          None, None, None, w, u)[0]

    assert torch.autograd.gradcheck(f, (p.hidden, p.weight, p.bias), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lam_per_call_overrides_the_options():
    p = make_problem(n=30, h=6, v=41, seed=8)
    options = CoTRaftLossOptions(p.score_token_ids, p.score_values, lam=1.0)
    from tract_dist.loss import cot_raft_loss_with_options

    for impl in ("fused", "reference"):
        o = CoTRaftLossOptions(p.score_token_ids, p.score_values, lam=1.0, impl=impl)
        got = cot_raft_loss_with_options(p.hidden, p.weight, p.targets, p.score_rows, p.score_targets, o,
                                         bias=p.bias, lam=0.25)
        want = cot_raft_loss(*p.args(), bias=p.bias, lam=0.25, impl=impl)
        assert torch.equal(got.loss, want.loss)
    with pytest.raises(ValueError, match="lam"):
        cot_raft_loss_with_options(p.hidden, p.weight, p.targets, p.score_rows, p.score_targets, options, lam=-1.0)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bad_weights_are_named(impl):
    p = make_problem(n=20, h=5, v=31, seed=9)
    m = p.score_rows.numel()
    with pytest.raises(ValueError, match="ce_weights must have shape"):
        cot_raft_loss(*p.args(), impl=impl, ce_weights=torch.ones(19))
    with pytest.raises(ValueError, match="mse_weights must have shape"):
        cot_raft_loss(*p.args(), impl=impl, mse_weights=torch.ones(m + 1))
    bad = torch.ones(20, dtype=torch.float64)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cot_raft_loss(*p.args(), impl=impl, ce_weights=bad)
    with pytest.raises(ValueError, match="finite"):
        cot_raft_loss(*p.args(), impl=impl, mse_weights=torch.full((m,), float("inf")))


def test_batch_weights_reach_the_rows(batch_and_tokens):
    batch, _, _ = batch_and_tokens
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    rows = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"],
                            ce_weights=w, mse_weights=-w)
    t = batch["labels"].shape[1]
    assert torch.equal(rows.ce_weights, w[rows.row_index // t])
    assert torch.equal(rows.mse_weights, -w)  # every sequence has a score row
    with pytest.raises(ValueError, match="one weight per example"):
        select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"], ce_weights=w[:3])
