"""Packed rows on CUDA: flash-attention's varlen kernel (when flash-attn is installed) and the per-example sdpa
give the padded batch's loss and gradients; skipped cleanly without a GPU (the CPU equality is
tests/train/test_batching.py, in float64)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rows(n: int, seed: int) -> list[dict]:
    """Judge-shaped rows of different lengths: prompt (ignored), CoT, score token (ignored), EOS."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt, cot = 200 + 97 * i, 40 + 13 * i
        ids = torch.randint(10, 500, (prompt + cot,), generator=g).tolist() + [16 + i % 5, 2]
        labels = [-100] * prompt + ids[prompt:prompt + cot] + [-100, 2]
        rows.append({"input_ids": ids, "labels": labels, "score_position": prompt + cot - 1, "score": 1.0 + i % 5})
    return rows


@pytest.mark.parametrize("attn", ["tract_packed_sdpa", "flash_attention_2"])
def test_packed_row_equals_padded_batch_on_cuda(attn):
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from tract_dist.loss import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM, build_tiny_model, tiny_llama_config
    from tract_dist.models.packed_attention import register_packed_sdpa
    from tract_dist.train.batching import collate_packed
    from tract_dist.train.data import collate

    register_packed_sdpa()
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32  # flash-attn runs 16-bit only
    model = build_tiny_model(tiny_llama_config(512, attn_implementation="sdpa", max_position_embeddings=2048),
                             seed=1).to("cuda", dtype)
    wrapper = CotRaftCausalLM(model, CoTRaftLossOptions([16, 17, 18, 19, 20], [1.0, 2.0, 3.0, 4.0, 5.0]))
    rows = _rows(4, seed=0)

    def run(batch):
        model.zero_grad()
        out = wrapper(**{k: v.cuda() for k, v in batch.items()})
        out.loss.backward()
        return out.loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    want, g_want = run(collate(rows, pad_id=0))  # sdpa with the padding mask
    model.set_attn_implementation(attn)
    got, g_got = run(collate_packed(rows))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(got - want) / abs(want) < tol
    assert (g_got - g_want).norm() / g_want.norm() < 5 * tol
