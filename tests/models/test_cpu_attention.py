"""The CPU decode dispatch computes what sdpa computes: float64 against transformers' own sdpa function, for
the attention call alone (grouped-query heads, boolean and additive masks, left padding) and for a whole
left-padded generation of the tiny Llama."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tract_dist.models import cpu_attention
from tract_dist.models.loading import choose_attn_implementation
from tract_dist.models.tiny import build_tiny_model, tiny_llama_config


class _Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("kv_heads,groups", [(4, 1), (2, 3)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_decode_step_equals_sdpa_in_float64(kv_heads, groups, mask_kind):
    g = torch.Generator().manual_seed(kv_heads * 10 + groups)
    b, keys, dim = 3, 17, 8
    q = torch.randn(b, kv_heads * groups, 1, dim, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads, keys, dim, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv_heads, keys, dim, generator=g, dtype=torch.float64)
    keep = torch.ones(b, 1, 1, keys, dtype=torch.bool)
    keep[1, ..., :5] = False  # left padding
    keep[2, ..., :11] = False
    mask = {"bool": keep, "none": None,
            "additive": torch.zeros(b, 1, 1, keys, dtype=torch.float64).masked_fill(~keep, torch.finfo(
                torch.float64).min)}[mask_kind]
    mod = _Heads(groups).eval()
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)
    got, none = cpu_attention.sdpa_cpu_decode_forward(mod, q, k, v, mask, scaling=0.3)
    assert none is None and got.shape == ref.shape == (b, 1, kv_heads * groups, dim)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # several query rows (prefill) are sdpa's own result
    q2 = torch.randn(b, kv_heads * groups, 4, dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cpu_attention.sdpa_cpu_decode_forward(mod, q2, k, v, None, scaling=0.3)[0],
                               sdpa_attention_forward(mod, q2, k, v, None, scaling=0.3)[0], rtol=0, atol=0)


def test_left_padded_generation_equals_sdpa_and_is_the_cpu_default():
    assert choose_attn_implementation(None, "cpu") == cpu_attention.NAME
    assert choose_attn_implementation("eager", "cpu") == "eager"
    model = build_tiny_model(tiny_llama_config(), seed=3, dtype=torch.float64).eval()
    ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0
    outs = {}
    for impl in ("sdpa", choose_attn_implementation(None, "cpu")):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    a, b = outs["sdpa"], outs[cpu_attention.NAME]
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.scores), torch.stack(a.scores), rtol=0, atol=1e-10)
