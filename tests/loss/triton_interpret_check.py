"""Run under TRITON_INTERPRET=1 (set before triton is imported): Triton kernels == PyTorch tile ops,
and the whole fused loss with the kernels forced on CPU == the PyTorch path == the reference.

Invoked as a subprocess by test_loss_triton_interpret.py; exits non-zero on any mismatch.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before importing triton"

import torch  # noqa: E402

from loss_helpers import make_problem, rel_err, run  # noqa: E402 - a script's folder is on sys.path

from tract_dist.loss import tile_ops, triton_kernels  # noqa: E402


def check_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, v, block in [(5, 203, 64), (3, 64, 64), (4, 17, 16), (6, 300, None)]:
            tile = (torch.randn(n, v, generator=g) * 4).to(dtype)
            m, s = triton_kernels.triton_tile_stats(tile, block=block)
            m_ref, s_ref = tile_ops.torch_tile_stats(tile, torch.float32)
            assert torch.equal(m, m_ref), (dtype, n, v)
            assert rel_err(s, s_ref) < 1e-6, (dtype, n, v, rel_err(s, s_ref))
            lse = m_ref + s_ref.log()
            a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
            tgt = torch.randint(-1, v, (n,), generator=g)
            tgt[0] = v - 1
            cols = torch.tensor([0, -1, v - 1, v // 2])
            e = torch.randn(n, 4, generator=g)
            for sc, ee in ((cols, e), (cols[:0], e[:, :0])):
                out = triton_kernels.triton_tile_grad(tile, torch.empty_like(tile), lse, a, tgt, b, sc, ee, block=block)
                ref = tile_ops.torch_tile_grad(tile, torch.empty(n, v), lse, a, tgt, b, sc, ee)
                # fp32: same math. bf16: the interpreter truncates fp32 -> bf16 stores (<= 1 bf16 ulp).
                tol = 2e-7 if dtype == torch.float32 else 2.0**-7
                assert (out.float() - ref).abs().max() <= tol * ref.abs().max(), (dtype, n, v)
                inplace = tile.clone()
                triton_kernels.triton_tile_grad(inplace, inplace, lse, a, tgt, b, sc, ee, block=block)
                assert torch.equal(inplace, out)


def check_fused_loss() -> None:
    p = make_problem(n=30, h=8, v=45, dtype=torch.float32, score_rows=[0, 7, 8, 29], score_ids=[0, 15, 16, 31, 44], seed=3)
    w = torch.linspace(-1.0, 2.0, 30, dtype=torch.float64)  # per-sequence weights (#24), per row here
    for opts in (dict(), dict(rail_normalize=True, ce_on_score_token=True, lam=0.5),
                 dict(ce_weights=w, mse_weights=torch.tensor([0.5, 2.0, -1.0, 0.0], dtype=torch.float64))):
        ref, g_ref = run(p, "reference", **opts)
        results = {}
        for mode in ("0", "force"):
            os.environ["TRACT_LOSS_TRITON"] = mode
            results[mode] = run(p, "fused", chunk_size=8, vocab_shard=16, **opts)
        os.environ["TRACT_LOSS_TRITON"] = "force"
        probe = torch.zeros(2, 3)
        assert tile_ops.use_triton(probe), "forced mode must route CPU tiles to Triton"
        (o_t, g_t), (o_p, g_p) = results["force"], results["0"]
        assert rel_err(o_t.loss, o_p.loss) < 1e-6 and rel_err(o_t.loss, ref.loss) < 1e-6
        assert rel_err(o_t.yhat, ref.yhat) < 1e-6
        for a, b, c in zip(g_t, g_p, g_ref):
            assert rel_err(a, b) < 1e-5 and rel_err(a, c) < 1e-5


if __name__ == "__main__":
    check_kernels()
    check_fused_loss()
    print("TRITON_INTERPRET checks passed")
