"""Micro-batch layouts of a step (padded, length-grouped, packed) and the packed forward against the padded one."""

from __future__ import annotations

import random

import pytest
import torch

from tract_dist.train.batching import BatchLayout, collate_packed, pack_step, split_padded
from tract_dist.train.data import collate


def _flat(layout: list[list[list[int]]]) -> list[int]:
    return [i for micro in layout for rank in micro for i in rank]


def test_padded_split_keeps_the_old_layout_and_spreads_uneven_steps():
    idx = list(range(100, 112))  # 12 samples: micro 2 x accum 3 x world 2
    layout = split_padded(idx, [1] * 200, world=2, micro=2)
    # slot m * world + r holds the micro samples from (m * world + r) * micro: the layout before this change
    assert layout == [[idx[(m * 2 + r) * 2:(m * 2 + r) * 2 + 2] for r in range(2)] for m in range(3)]
    # the same 12 samples on 5 workers (a resumed run): at most 2 per micro-batch, every sample once, every
    # rank the same number of micro-batches, sizes as even as possible (empty ones become fillers)
    five = split_padded(idx, [1] * 200, world=5, micro=2)
    assert len(five) == 2 and all(len(m) == 5 for m in five)
    assert sorted(_flat(five)) == idx and max(len(s) for m in five for s in m) <= 2
    assert [len(s) for m in five for s in m] == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    batches = BatchLayout(world_size=3, micro_batch_size=1).rank_batches(idx[:4], [1] * 200, rank=2)
    assert [(b.indices, b.filler) for b in batches] == [((102,), False), ((100,), True)]


def test_length_grouping_sorts_the_step_and_balances_each_forward():
    rnd = random.Random(0)
    lengths = [rnd.randint(50, 3000) for _ in range(64)]
    idx = list(range(64))
    plain = split_padded(idx, lengths, world=4, micro=4)
    grouped = split_padded(idx, lengths, world=4, micro=4, group_by_length=True)
    assert sorted(_flat(grouped)) == idx

    def padded_tokens(layout):
        return sum(len(s) * max(lengths[i] for i in s) for m in layout for s in m)

    def step_cost(layout):  # every forward lasts as long as its largest micro-batch (ZeRO-3 waits for it)
        return sum(max(len(s) * max(lengths[i] for i in s) for s in m) for m in layout)

    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)
    assert step_cost(grouped) < 0.75 * step_cost(plain)


def test_packing_fills_rows_within_the_budget_and_balances_them():
    rnd = random.Random(1)
    lengths = [min(3000, max(200, int(rnd.gauss(1300, 500)))) for _ in range(64)]
    idx = list(range(64))
    layout = pack_step(idx, lengths, world=8, budget=16384)
    rows = [r for m in layout for r in m]
    assert sorted(_flat(layout)) == idx and all(len(m) == 8 for m in layout)
    loads = [sum(lengths[i] for i in r) for r in rows]
    assert max(loads) <= 16384
    assert len(layout) == max(1, -(-sum(lengths) // (8 * 16384)))  # the fewest rows per rank that fit
    assert max(loads) - min(loads) <= max(lengths)  # LPT: rows within one sample of each other
    with pytest.raises(ValueError, match="does not fit a packed row of 1000 tokens"):
        pack_step(idx, lengths, world=8, budget=1000)
    # more rows than samples fit: empty rows, which the rank runs as fillers
    tight = pack_step([0, 1, 2], [10, 10, 10], world=2, budget=10)
    assert sorted(_flat(tight)) == [0, 1, 2] and sum(1 for m in tight for r in m if not r) == 1


def _encoded(examples, max_length: int):
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.data.encode import EncodeOptions, encode_examples
    from tract_dist.data.score_tokens import derive_score_tokens

    tok = load_tokenizer("smollm2")
    st = derive_score_tokens(tok, (1, 5))
    enc, stats = encode_examples(tok, examples, st, EncodeOptions(max_length=max_length))
    assert stats.encoded == len(examples)
    return tok, st, [e.to_dict() for e in enc]


@pytest.mark.parametrize("attn,weights", [("sdpa", None), ("tract_packed_sdpa", (0.25, 1.5, 0.8))])
def test_packed_loss_and_gradients_equal_padded_in_float64(quickstart_examples, attn, weights):
    """Real Vicuna records (the committed sample) through a tiny Llama in float64: one packed row gives the loss,
    CE, MSE, ŷ and gradient of every parameter of a padded batch of the same records (sdpa with its padding mask),
    with the step's global denominators as training passes them. Packed attention: transformers' block-diagonal
    mask (sdpa; eager builds the same mask, but its softmax runs in float32) or one causal sdpa per example
    (tract_packed_sdpa, the training default with sdpa, which also runs the padded batch here: plain causal sdpa,
    exact for right padding). Position ids that do not restart, without the example bounds (attention across
    examples), give another loss, so the equality is not vacuous. The second case is a weighted data set (the
    encoded ``weight`` column of stage-2 selection): each example's weight reaches its own CE tokens and squared
    error in the packed row (through ``sequence_index``) as in the padded batch; the same weights given to the
    wrong examples give another loss."""
    from tract_dist.loss import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM, build_tiny_model, tiny_llama_config
    from tract_dist.models.packed_attention import register_packed_sdpa

    register_packed_sdpa()
    # records 15, 8 and 4: 696, 952 and 998 tokens untruncated (SmolLM2's template), so the padded batch pads
    tok, st, rows = _encoded([quickstart_examples[i] for i in (15, 8, 4)], max_length=1024)
    assert len({len(r["input_ids"]) for r in rows}) == 3
    if weights is not None:
        rows = [{**r, "weight": w} for r, w in zip(rows, weights)]
    model = build_tiny_model(tiny_llama_config(len(tok), attn_implementation="sdpa", max_position_embeddings=512),
                             seed=3).double()
    wrapper = CotRaftCausalLM(model, CoTRaftLossOptions(st.token_ids, st.scores, lam=0.5, impl="fused"))
    den = {"ce_denominator": 1.7 * sum(sum(x != -100 for x in r["labels"]) for r in rows), "mse_denominator": 9.0}

    def run(batch):
        model.zero_grad()
        out = wrapper(**batch, **den)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_batch, packed_batch = collate(rows, tok.pad_token_id), collate_packed(rows)
    reference, g_reference = run(padded_batch)  # with the padding mask
    model.set_attn_implementation(attn)
    assert packed_batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert packed_batch["cu_seq_lens"].tolist() == [0, 696, 696 + 952, 696 + 952 + 998]
    if weights is not None:
        for key in ("ce_weights", "mse_weights"):
            assert packed_batch[key].tolist() == padded_batch[key].tolist() == list(weights)
    # tract_packed_sdpa also runs the padded batch (plain causal sdpa); with sdpa that would repeat the reference
    for batch in (packed_batch, padded_batch) if attn != "sdpa" else (packed_batch,):
        out, grads = run(batch)
        for name in ("loss", "ce", "mse", "yhat"):
            torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=1e-10, atol=1e-12)
        assert (out.n_ce_tokens, out.n_score_rows) == (reference.n_ce_tokens, reference.n_score_rows) != (0, 0)
        for name, g in g_reference.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=name)
    leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1])[None], cu_seq_lens=None)
    with torch.no_grad():
        assert abs(wrapper(**leaky, **den).loss.item() - reference.loss.item()) > 1e-3
        if weights is not None:
            swapped = dict(packed_batch, ce_weights=packed_batch["ce_weights"].flip(0),
                           mse_weights=packed_batch["mse_weights"].flip(0))
            assert abs(wrapper(**swapped, **den).loss.item() - reference.loss.item()) > 1e-3


def test_packed_training_runs_sdpa_per_example_whatever_the_sdpa_default():
    """A packed run whose attention would be sdpa, or the CPU default that is sdpa for training
    (models.cpu_attention), trains with tract_packed_sdpa; a padded run keeps the default; other kernels stay."""
    from tract_dist.config import load_config
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.models import cpu_attention
    from tract_dist.models.packed_attention import PACKED_SDPA, packed_implementation
    from tract_dist.train.model_init import load_training_model

    base = {"model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"}, "data": {"max_length": 512}}
    tok = load_tokenizer("smollm2")
    for packing, want in ((True, PACKED_SDPA), (False, cpu_attention.NAME)):
        cfg = load_config(None, [f"training.packing={str(packing).lower()}"], base=base)
        assert load_training_model(cfg, tok, use_cuda=False).config._attn_implementation == want
    assert [packed_implementation(a) for a in ("sdpa", cpu_attention.NAME, "flash_attention_2", "eager")] == [
        PACKED_SDPA, PACKED_SDPA, "flash_attention_2", "eager"]
