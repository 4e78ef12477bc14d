"""Vocab-parallel fused loss on 2 gloo processes == the unsharded reference (loss and gradients)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from loss_helpers import make_problem, rel_err, run  # tests/loss is on sys.path (pytest's; spawn copies it)

from tract_dist.loss import cot_raft_loss

# (split of V=53 between ranks 0 and 1, options, dtype, tolerance)
_W = torch.linspace(-0.5, 2.0, 40, dtype=torch.float64)  # signed per-row CE weights (#24)
CASES = [
    ([27, 26], dict(), torch.float64, 1e-12),
    ([27, 26], dict(ce_weights=_W, mse_weights=_W[:5].flip(0), rail_normalize=True), torch.float64, 1e-12),
    ([40, 13], dict(rail_normalize=True, ce_on_score_token=True, lam=0.4), torch.float64, 1e-12),
    ([53, 0], dict(ce_on_score_token=True), torch.float64, 1e-12),  # an empty shard still joins in
    ([20, 33], dict(), torch.float32, 1e-5),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for split, opts, dtype, tol in CASES:
            # Score tokens and targets fall on both shards (ids on either side of every split).
            p = make_problem(n=40, h=9, v=53, dtype=dtype, score_ids=[0, 12, 26, 27, 39, 40, 52], n_scale=7, seed=21)
            ref, g_ref = run(p, "reference", **opts)
            lo = sum(split[:rank])
            hi = lo + split[rank]
            w = p.weight.detach()[lo:hi].clone().requires_grad_()
            b = p.bias.detach()[lo:hi].clone().requires_grad_()
            h = p.hidden.detach().clone().requires_grad_()
            out = cot_raft_loss(
                h, w, *p.args()[2:], bias=b, process_group=dist.group.WORLD, vocab_start=lo,
                chunk_size=6, vocab_shard=8, **opts,
            )
            gh, gw, gb = torch.autograd.grad(out.loss, [h, w, b])
            assert rel_err(out.loss, ref.loss) < tol, (split, opts)
            assert rel_err(out.yhat, ref.yhat) < tol
            assert out.n_ce_tokens == ref.n_ce_tokens
            assert rel_err(gh, g_ref[0]) < tol, (split, opts, "hidden")
            if hi > lo:
                assert rel_err(gw, g_ref[1][lo:hi]) < tol, (split, opts, "weight")
                assert rel_err(gb, g_ref[2][lo:hi]) < tol, (split, opts, "bias")
            assert gw.shape == w.shape and gb.shape == b.shape
        # Multi-token score values (#29): the trie pre-pass combines its node rows' statistics across the ranks.
        p = make_problem(n=40, h=9, v=53, dtype=torch.float64, score_ids=[0, 12, 26, 27, 39, 40], n_scale=6, seed=3)
        seqs = [[0, 52], [12], [26], [27], [39], [0, 40]]  # "1" + terminator, ..., "1", "0": ids on both shards
        taken = set(p.score_rows.tolist())
        branch = torch.tensor([r for r in range(40) if r not in taken][: p.score_rows.numel()])[:, None]
        kw = dict(score_sequences=seqs, score_branch_rows=branch, lam=0.7, ce_on_score_token=True)
        empty = torch.empty(0, dtype=torch.long)
        args = (p.targets, p.score_rows, p.score_targets, empty, p.score_values)
        ref = cot_raft_loss(p.hidden, p.weight, *args, bias=p.bias, impl="reference", **kw)
        g_ref = torch.autograd.grad(ref.loss, [p.hidden, p.weight, p.bias])
        lo, hi = (0, 27) if rank == 0 else (27, 53)
        w = p.weight.detach()[lo:hi].clone().requires_grad_()
        b = p.bias.detach()[lo:hi].clone().requires_grad_()
        h = p.hidden.detach().clone().requires_grad_()
        out = cot_raft_loss(h, w, *args, bias=b, process_group=dist.group.WORLD, vocab_start=lo, chunk_size=6,
                            vocab_shard=8, **kw)
        gh, gw, gb = torch.autograd.grad(out.loss, [h, w, b])
        assert rel_err(out.loss, ref.loss) < 1e-12 and rel_err(out.yhat, ref.yhat) < 1e-12
        assert rel_err(gh, g_ref[0]) < 1e-12 and rel_err(gw, g_ref[1][lo:hi]) < 1e-12
        assert rel_err(gb, g_ref[2][lo:hi]) < 1e-12
        # A wrong vocab_start is detected rather than silently mis-indexing.
        with pytest.raises(ValueError):
            p = make_problem(n=10, h=4, v=53, seed=1)
            cot_raft_loss(
                p.hidden, p.weight[rank * 27 : (rank + 1) * 27 if rank == 0 else 53], *p.args()[2:],
                process_group=dist.group.WORLD, vocab_start=5,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_vocab_parallel_two_gloo_ranks_match_unsharded():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
