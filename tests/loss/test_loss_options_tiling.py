"""The options object, the tile-size rule, the fp32 accumulation helper and the backward's scaling."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import make_problem, rel_err, run

from tract_dist.config import LossSection
from tract_dist.loss import CoTRaftLossOptions, cot_raft_loss, cot_raft_loss_with_options
from tract_dist.loss.accumulate import matmul_into
from tract_dist.loss.tiling import CPU_TILE_BYTES, ROW_ALIGN, ROW_MULTIPLE, chunk_rows, vocab_shard_size


def test_options_from_config_carry_every_setting():
    section = LossSection(lam=0.25, rail_normalize=True, ce_on_score_token=True, impl="reference", kernel="torch",
                          chunk_size=96, vocab_shard=4096, tile_mib=64)
    opt = CoTRaftLossOptions.from_config(section, [5, 6, 7], [1, 2, 3])
    assert (opt.lam, opt.rail_normalize, opt.ce_on_score_token, opt.impl, opt.kernel) == (
        0.25, True, True, "reference", "torch")
    assert (opt.chunk_size, opt.vocab_shard, opt.tile_bytes) == (96, 4096, 64 << 20)
    assert opt.score_token_ids == (5, 6, 7) and opt.score_values == (1.0, 2.0, 3.0)
    assert CoTRaftLossOptions.from_config(LossSection(), [1], [1.0]).tile_bytes is None


@pytest.mark.parametrize("bad", [dict(lam=float("nan")), dict(lam=-1.0), dict(impl="nope"), dict(kernel="cuda"),
                                 dict(chunk_size=0), dict(score_token_ids=(3, 3)), dict(score_values=(1.0,))])
def test_options_reject_bad_values(bad):
    kw = dict(score_token_ids=(3, 4), score_values=(1.0, 2.0)) | bad
    with pytest.raises(ValueError):
        CoTRaftLossOptions(**kw)


def test_score_tensors_are_built_once_per_device_and_dtype():
    opt = CoTRaftLossOptions((3, 4), (1.0, 2.0))
    ids, values = opt.score_tensors(torch.device("cpu"), torch.float32)
    again = opt.score_tensors(torch.device("cpu"), torch.float32)
    assert again[0] is ids and again[1] is values
    assert opt.score_tensors(torch.device("cpu"), torch.float64)[1].dtype == torch.float64


def test_options_entry_equals_keyword_entry():
    p = make_problem(seed=51)
    kw = dict(lam=0.4, rail_normalize=True, ce_on_score_token=True, chunk_size=5, vocab_shard=9)
    a = cot_raft_loss(*p.args(), bias=p.bias, ce_denominator=17, **kw)
    opt = CoTRaftLossOptions(p.score_token_ids, p.score_values, **kw)
    b = cot_raft_loss_with_options(*p.args()[:5], opt, bias=p.bias, ce_denominator=17)
    assert a.loss.item() == b.loss.item() and (a.n_ce_tokens, a.n_score_rows) == (b.n_ce_tokens, b.n_score_rows)


@pytest.mark.parametrize("n_active", [1, 63, 64, 500, 1023, 1024, 1025, 4097, 20000])
def test_chunk_rule_fits_the_budget_and_balances_chunks(n_active):
    v, elem = 128256, 2
    chunk = chunk_rows(n_active, v, elem, CPU_TILE_BYTES, None)
    assert chunk * v * elem <= CPU_TILE_BYTES
    n_chunks = -(-n_active // chunk)
    cap = CPU_TILE_BYTES // (v * elem)
    assert n_chunks == -(-n_active // (cap - cap % ROW_MULTIPLE))  # as few chunks as the budget allows
    last = n_active - (n_chunks - 1) * chunk
    assert 0 < last and last >= chunk - ROW_ALIGN * n_chunks  # balanced: no tiny last chunk
    assert chunk_rows(n_active, v, elem, CPU_TILE_BYTES, 7) == 7  # an explicit size wins


def test_vocab_shard_rule():
    assert vocab_shard_size(128256, None) == 128256
    assert vocab_shard_size(256000, None) == 1 << 16
    assert vocab_shard_size(128256, 1000) == 1000


@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_into_fp32_from_bf16_operands(accumulate, monkeypatch):
    import tract_dist.loss.accumulate as acc_mod

    monkeypatch.setattr(acc_mod, "TEMP_BYTES", 4096)  # force many row blocks
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 40, generator=g).bfloat16()
    b = torch.randn(40, 70, generator=g).bfloat16()
    out = torch.randn(300, 70, generator=g)
    start = out.clone()
    matmul_into(out, a, b, accumulate=accumulate)
    # Each block's product is rounded to bf16 once (the CPU build has no fp32-output bf16 matmul).
    expected = (start if accumulate else 0) + a.double() @ b.double()
    bound = 2**-8 * (a.double().abs() @ b.double().abs()).max()
    assert (out.double() - expected).abs().max() <= bound


def test_retained_graph_backward_twice_and_scaled():
    p = make_problem(seed=52)
    _, g_ref = run(p, "reference")
    out = cot_raft_loss(*p.args(), bias=p.bias, chunk_size=6, vocab_shard=20)
    (2.0 * out.loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in p.leaves()]
    (3.0 * out.loss).backward()
    for g1, leaf, ref in zip(first, p.leaves(), g_ref):
        assert rel_err(g1, 2.0 * ref) < 1e-12
        assert rel_err(leaf.grad, 5.0 * ref) < 1e-12


def test_second_backward_after_zero_scale_is_refused():
    p = make_problem(seed=53)
    out = cot_raft_loss(*p.args(), bias=p.bias)
    (0.0 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="zero grad_output"):
        out.loss.backward()
