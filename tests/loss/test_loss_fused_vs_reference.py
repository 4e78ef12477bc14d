"""Fused CoT-RAFT loss against the materialised reference (float64 / float32 / bf16, all options)."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import make_problem, rel_err, run

from tract_dist.loss import CoTRaftLossOptions, cot_raft_loss
from tract_dist.loss.fused import FusedCoTRaftFunction

OPTIONS = [
    dict(),
    dict(rail_normalize=True),
    dict(ce_on_score_token=True),
    dict(rail_normalize=True, ce_on_score_token=True, lam=0.3),
]
TILES = [dict(), dict(chunk_size=8, vocab_shard=16), dict(chunk_size=5, vocab_shard=7), dict(chunk_size=1, vocab_shard=1)]


def _check(p, tol_loss: float, tol_grad: float, **kw) -> None:
    ref, g_ref = run(p, "reference", **{k: v for k, v in kw.items() if k not in ("chunk_size", "vocab_shard")})
    out, g = run(p, "fused", **kw)
    assert rel_err(out.loss, ref.loss) <= tol_loss
    assert rel_err(out.ce, ref.ce) <= tol_loss
    assert abs(float(out.mse) - float(ref.mse)) <= tol_loss * max(1.0, float(ref.mse))
    if ref.yhat.numel():
        assert rel_err(out.yhat, ref.yhat) <= tol_loss
    assert (out.n_ce_tokens, out.n_score_rows) == (ref.n_ce_tokens, ref.n_score_rows)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= tol_grad


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rail", "ce_score", "rail+ce_score"])
@pytest.mark.parametrize("tiles", TILES, ids=["auto", "8x16", "5x7", "1x1"])
def test_float64_matches_reference(opts, tiles):
    p = make_problem(dtype=torch.float64, seed=1)
    _check(p, 1e-13, 1e-12, **opts, **tiles)


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rail", "ce_score", "rail+ce_score"])
def test_gradcheck_fused_float64(opts):
    p = make_problem(n=9, h=4, v=13, dtype=torch.float64, score_rows=[2, 7], n_scale=4, seed=2)

    options = CoTRaftLossOptions(
        p.score_token_ids, p.score_values, lam=opts.get("lam", 1.0),
        rail_normalize=opts.get("rail_normalize", False), ce_on_score_token=opts.get("ce_on_score_token", False),
        chunk_size=4, vocab_shard=5,
    )

    def f(hidden, weight, bias):
        args = (p.targets, p.score_rows, p.score_targets, options, None, None)
        return FusedCoTRaftFunction.apply(hidden, weight, bias, *args)[0]

    assert torch.autograd.gradcheck(f, (p.hidden, p.weight, p.bias), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "rail", "ce_score", "rail+ce_score"])
def test_float32_matches_reference(opts):
    p = make_problem(n=300, h=24, v=301, dtype=torch.float32, seed=3)
    _check(p, 1e-6, 1e-5, chunk_size=64, vocab_shard=100, **opts)
    _check(p, 1e-6, 1e-5, **opts)


@pytest.mark.parametrize("opts", OPTIONS[:2], ids=["plain", "rail"])
def test_bf16_inputs_within_bf16_rounding(opts):
    # Fused: bf16 logits tile and bf16 dlogits into the grad matmuls (as on GPU), fp32 statistics.
    # Reference: fp32 logits of the same bf16 inputs. Logits are O(3) here, so a bf16 rounding of the
    # logits (2^-9 relative) moves the loss by ~1e-2 at most; gradients carry one bf16 rounding of
    # dlogits and of the output (~2^-8 each).
    p = make_problem(n=200, h=32, v=257, dtype=torch.bfloat16, scale=0.6, seed=4)
    _check(p, 1e-2, 3e-2, chunk_size=48, vocab_shard=64, **opts)


def test_odd_shapes_and_boundaries():
    # All rows active, so active index == row index: score rows sit on both sides of chunk
    # boundaries (chunk 8) and score tokens on both sides of shard boundaries (shard 16), plus the
    # first and last vocabulary ids.
    p = make_problem(n=35, h=7, v=67, ignore_frac=0.0, score_rows=[0, 7, 8, 15, 16, 34], score_ids=[0, 15, 16, 47, 48, 66])
    for opts in OPTIONS:
        _check(p, 1e-13, 1e-12, chunk_size=8, vocab_shard=16, **opts)


@pytest.mark.parametrize("n_scale", [5, 10])
def test_scales(n_scale):
    p = make_problem(n=40, h=6, v=71, n_scale=n_scale, seed=5)
    assert p.score_values.tolist() == list(range(1, n_scale + 1))
    for opts in OPTIONS:
        _check(p, 1e-13, 1e-12, chunk_size=16, vocab_shard=32, **opts)


def test_no_bias():
    p = make_problem(bias=False, seed=6)
    _check(p, 1e-13, 1e-12, chunk_size=8, vocab_shard=16)


def test_no_score_rows():
    p = make_problem(score_rows=[], seed=7)
    out, g = run(p, "fused", chunk_size=8, vocab_shard=16)
    ref, g_ref = run(p, "reference")
    assert float(out.mse) == 0.0 and out.yhat.numel() == 0 and out.n_score_rows == 0
    assert rel_err(out.loss, ref.loss) < 1e-13
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_everything_ignored_gives_zero_and_is_differentiable(impl):
    p = make_problem(score_rows=[], ignore_frac=1.0, seed=8)
    assert bool((p.targets == -100).all())
    out, g = run(p, impl)
    assert out.loss.item() == 0.0 and float(out.ce) == 0.0 and float(out.mse) == 0.0
    assert out.loss.requires_grad and out.n_ce_tokens == 0
    assert all(bool((t == 0).all()) for t in g)


def test_only_score_rows_active():
    p = make_problem(ignore_frac=1.0, seed=9)
    out, g = run(p, "fused", chunk_size=3, vocab_shard=10)
    ref, g_ref = run(p, "reference")
    assert float(out.ce) == 0.0 and float(out.mse) > 0
    assert rel_err(out.loss, ref.loss) < 1e-13
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-12
    # Ignored rows get exactly zero gradient.
    inactive = torch.ones(p.hidden.shape[0], dtype=torch.bool)
    inactive[p.score_rows] = False
    assert bool((g[0][inactive] == 0).all())


def test_ce_on_score_token_uses_nearest_value_and_counts_it():
    p = make_problem(score_rows=[1, 4, 6], ignore_frac=1.0, n_scale=5, seed=10)
    p.score_targets = torch.tensor([1.4, 2.5, 4.6], dtype=torch.float64)  # -> values 1, 2 (tie -> first), 5
    out = cot_raft_loss(*p.args(), bias=p.bias, ce_on_score_token=True, lam=0.0)
    assert out.n_ce_tokens == 3
    # Independent: CE with those explicit targets and ce_on_score_token off.
    tgt = p.targets.clone()
    tgt[p.score_rows] = p.score_token_ids[torch.tensor([0, 1, 4])]
    logits = p.hidden.detach() @ p.weight.detach().T + p.bias.detach()
    expected = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100)
    assert abs(out.loss.item() - float(expected)) < 1e-13


def test_gradient_accumulation_equals_big_batch():
    p = make_problem(n=60, seed=11, score_rows=[3, 10, 22, 31, 40, 59])
    kw = dict(bias=p.bias, lam=0.8, ce_on_score_token=True, chunk_size=7, vocab_shard=20)
    big = cot_raft_loss(*p.args(), **kw)
    g_big = torch.autograd.grad(big.loss, p.leaves())
    n_ce = big.n_ce_tokens
    n_sc = big.n_score_rows
    total = 0.0
    g_acc = [torch.zeros_like(t) for t in p.leaves()]
    for lo, hi in [(0, 17), (17, 41), (41, 60)]:
        sel = (p.score_rows >= lo) & (p.score_rows < hi)
        out = cot_raft_loss(
            p.hidden[lo:hi], p.weight, p.targets[lo:hi], p.score_rows[sel] - lo, p.score_targets[sel],
            p.score_token_ids, p.score_values, ce_denominator=n_ce, mse_denominator=n_sc, **kw,
        )
        total += out.loss.item()
        for acc, g in zip(g_acc, torch.autograd.grad(out.loss, p.leaves())):
            acc += g
    assert abs(total - big.loss.item()) < 1e-13
    for a, b in zip(g_acc, g_big):
        assert rel_err(a, b) < 1e-12


def test_denominators_scale_terms():
    p = make_problem(seed=12)
    base = cot_raft_loss(*p.args(), bias=p.bias)
    scaled = cot_raft_loss(*p.args(), bias=p.bias, ce_denominator=4 * base.n_ce_tokens, mse_denominator=2 * base.n_score_rows)
    assert abs(float(scaled.ce) - float(base.ce) / 4) < 1e-14
    assert abs(float(scaled.mse) - float(base.mse) / 2) < 1e-14


def test_grad_output_scaling_and_no_weight_grad():
    p = make_problem(seed=13)
    out = cot_raft_loss(*p.args(), bias=p.bias)
    (3.0 * out.loss).backward()
    ref, g_ref = run(p, "reference")
    assert rel_err(p.hidden.grad, 3.0 * g_ref[0]) < 1e-12
    assert rel_err(p.weight.grad, 3.0 * g_ref[1]) < 1e-12
    frozen = p.weight.detach()
    out2 = cot_raft_loss(p.hidden, frozen, *p.args()[2:], bias=None)
    (gh,) = torch.autograd.grad(out2.loss, [p.hidden])
    ref2 = cot_raft_loss(p.hidden, frozen, *p.args()[2:], impl="reference")
    (gh_ref,) = torch.autograd.grad(ref2.loss, [p.hidden])
    assert rel_err(gh, gh_ref) < 1e-12


def test_forward_without_grad():
    p = make_problem(seed=14)
    with torch.no_grad():
        out = cot_raft_loss(*p.args(), bias=p.bias, chunk_size=8, vocab_shard=16)
    ref = cot_raft_loss(*p.args(), bias=p.bias, impl="reference")
    assert not out.loss.requires_grad
    assert rel_err(out.loss, ref.loss) < 1e-13


def test_invalid_inputs_raise():
    p = make_problem(seed=15)
    with pytest.raises(ValueError):
        cot_raft_loss(*p.args()[:3], p.score_rows.repeat(2), p.score_targets.repeat(2), *p.args()[5:])
    bad = p.targets.clone()
    bad[0] = p.weight.shape[0]
    with pytest.raises(ValueError):
        cot_raft_loss(p.hidden, p.weight, bad, *p.args()[3:])
    with pytest.raises(ValueError):
        cot_raft_loss(*p.args(), impl="nope")
