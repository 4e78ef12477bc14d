"""The fused loss reads device values on the host a fixed number of times per call, none inside its chunk loop.

On CUDA every such read (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, ``unique``, ``torch.equal``)
waits for the GPU queue to drain. CPU tensors make them visible here: a dispatch mode sees the ops that
read device memory back (``_local_scalar_dense``, ``nonzero``, ...) and ``Tensor.tolist`` is wrapped (it
reads memory without a dispatched op on CPU). The CUDA counterpart (torch's sync debug mode) is in
``test_loss_gpu.py``.
"""

from __future__ import annotations

import torch
from loss_helpers import make_problem
from torch.utils._python_dispatch import TorchDispatchMode

from tract_dist.loss import cot_raft_loss

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.masked_select.default,
}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _host_reads(monkeypatch, backward: bool = True, weighted: bool = False, **tiles) -> list[str]:
    p = make_problem(n=100, h=16, v=211, dtype=torch.float32, score_rows=list(range(5, 100, 13)), seed=21)
    if weighted:  # per-sequence weights (#24): device tensors gathered with the rows, checked in the one read
        tiles = {**tiles, "ce_weights": torch.rand(100), "mse_weights": torch.rand(p.score_rows.numel())}
    counter = HostReads()
    original = torch.Tensor.tolist

    def counted_tolist(self):
        counter.ops.append("tolist")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with counter:
        out = cot_raft_loss(*p.args(), bias=p.bias, rail_normalize=True, ce_on_score_token=True, **tiles)
        if backward:
            torch.autograd.grad(3.0 * out.loss, p.leaves())
    monkeypatch.setattr(torch.Tensor, "tolist", original)
    return counter.ops


def test_host_reads_do_not_grow_with_chunks_or_shards(monkeypatch):
    one_tile = _host_reads(monkeypatch)
    many = _host_reads(monkeypatch, chunk_size=7, vocab_shard=30)  # ~10 chunks x 8 shards
    assert many == one_tile
    # The row plan: one read of every check and count together, one for the active-row count (nonzero).
    assert sorted(one_tile) == sorted(["tolist", str(torch.ops.aten.nonzero.default)])
    assert _host_reads(monkeypatch, weighted=True, chunk_size=7, vocab_shard=30) == one_tile


def test_backward_reads_nothing(monkeypatch):
    forward_only = _host_reads(monkeypatch, backward=False, chunk_size=7, vocab_shard=30)
    assert forward_only == _host_reads(monkeypatch, chunk_size=7, vocab_shard=30)


def test_counter_sees_a_sync():
    # The instrument itself: a loop with .item() per chunk is counted per chunk.
    counter = HostReads()
    with counter:
        x = torch.arange(10.0)
        for c in x.split(3):
            c.sum().item()
    assert len(counter.ops) == 4
