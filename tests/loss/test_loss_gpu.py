"""CUDA checks (Triton kernels in the loop); skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import make_problem, rel_err, run

from tract_dist.loss import cot_raft_loss, tile_ops
from tract_dist.loss.memory_probe import peak_tensor_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _to_cuda(p):
    for name in ("hidden", "weight", "bias"):
        t = getattr(p, name)
        if t is not None:
            setattr(p, name, t.detach().cuda().requires_grad_())
    for name in ("targets", "score_rows", "score_targets", "score_token_ids", "score_values"):
        setattr(p, name, getattr(p, name).cuda())
    return p


@pytest.mark.parametrize("opts", [dict(), dict(rail_normalize=True, ce_on_score_token=True)])
def test_cuda_fp32_triton_matches_reference(opts):
    pytest.importorskip("triton")
    p = _to_cuda(make_problem(n=700, h=64, v=1031, dtype=torch.float32, seed=31))
    assert tile_ops.use_triton(p.hidden)
    ref, g_ref = run(p, "reference", **opts)
    out, g = run(p, "fused", chunk_size=128, vocab_shard=300, **opts)
    # TF32 may be on for cuBLAS matmuls; allow for it.
    assert rel_err(out.loss, ref.loss) < 1e-3
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("opts", [dict(), dict(rail_normalize=True)])
def test_cuda_bf16_triton_vs_fp32_reference(opts):
    pytest.importorskip("triton")
    p = _to_cuda(make_problem(n=2000, h=128, v=4099, dtype=torch.bfloat16, scale=0.3, seed=32))
    ref, g_ref = run(p, "reference", **opts)
    out, g = run(p, "fused", chunk_size=512, vocab_shard=1024, **opts)
    assert rel_err(out.loss, ref.loss) < 1e-2
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 3e-2


def test_cuda_memory_fused_vs_materialised():
    n, h, v = 8192, 256, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    sr = torch.arange(0, n, 256, device="cuda")
    t[sr] = -100
    args = (t, sr, torch.rand(sr.numel(), device="cuda") * 4 + 1, torch.arange(16, 21, device="cuda"),
            torch.arange(1.0, 6.0, device="cuda"))

    def step(impl):
        return lambda: torch.autograd.grad(cot_raft_loss(hid, w, *args, impl=impl).loss, (hid, w))

    _, ref_peak = peak_tensor_bytes(step("reference"), "cuda")
    _, fused_peak = peak_tensor_bytes(step("fused"), "cuda")
    assert fused_peak <= ref_peak / 4


def _sync_warnings(fn) -> int:
    """CUDA synchronisations inside ``fn``, counted by torch's sync debug mode (one warning each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_cuda_host_syncs_do_not_grow_with_chunks():
    pytest.importorskip("triton")
    p = _to_cuda(make_problem(n=2048, h=64, v=4099, dtype=torch.bfloat16, scale=0.3, seed=33))

    def step(**tiles):
        return lambda: torch.autograd.grad(
            cot_raft_loss(*p.args(), bias=p.bias, **tiles).loss, p.leaves())

    step()()  # warm-up: Triton compilation and the out_dtype probe
    one = _sync_warnings(step())
    many = _sync_warnings(step(chunk_size=64, vocab_shard=1024))  # 32 chunks x 5 shards
    assert many == one <= 3, (one, many)


def test_cuda_fp32_output_matmul_accumulates_exactly_like_fp32():
    from tract_dist.loss.accumulate import cuda_out_dtype_supported, matmul_into

    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(512, 256, device="cuda", generator=g).bfloat16()
    b = torch.randn(256, 384, device="cuda", generator=g).bfloat16()
    out = torch.randn(512, 384, device="cuda", generator=g)
    start = out.clone()
    matmul_into(out, a, b, accumulate=True)
    ref = start.double() + a.double() @ b.double()
    assert cuda_out_dtype_supported(torch.cuda.current_device()), "torch on this machine lacks out_dtype matmuls"
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()  # fp32 accumulation: no bf16 rounding
