"""Training on a multi-token scale (#29): SmolLM2's 1-10 ("10" = "1", "0"; "1" ends with EOS). The padded batch
appends one token per internal trie node under a tree mask; the model's CoT-RAFT loss and its gradients equal an
independent float64 computation: a plain causal forward of each training sequence for the CE, and one
teacher-forced forward per value for p(v)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tract_dist.data.encode import EncodeOptions, encode_examples
from tract_dist.data.score_scale import derive_score_scale
from tract_dist.loss import CoTRaftLossOptions
from tract_dist.models import causal_lm_cot_raft_loss
from tract_dist.train.data import collate

LAM = 0.3


def test_multi_token_training_loss_and_gradients(tiny_export, quickstart_examples, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from tract_dist.models.loading import load_tokenizer_for

    tok = load_tokenizer_for(tiny_export)
    model = AutoModelForCausalLM.from_pretrained(tiny_export, dtype=torch.float64, attn_implementation="sdpa")
    scale = derive_score_scale(tok, "1-10")
    exs = [replace(quickstart_examples[0], score=10.0), replace(quickstart_examples[1], score=1.0),
           replace(quickstart_examples[2], score=7.0)]
    exs = [replace(e, feedback=e.feedback[:80], instruction=e.instruction[:80], reference_answer=None,
                   score_descriptions=[d[:20] for d in e.score_descriptions]) for e in exs]
    enc, stats = encode_examples(tok, exs[:2], scale, EncodeOptions(max_length=380, scale=(1, 10)))
    short, _ = encode_examples(tok, exs[2:], scale, EncodeOptions(max_length=340, scale=(1, 10)))  # padded in batch
    enc += short
    assert stats.encoded + len(short) == 3 and len({len(e.input_ids) for e in enc}) > 1 and all(e.branch_positions and len(e.branch_positions) == 1 for e in enc)
    rows = [e.to_dict() for e in enc]
    batch = collate(rows, tok.pad_token_id)
    assert batch["attention_mask"].shape[1:] == (1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    options = CoTRaftLossOptions((), tuple(float(v) for v in scale.scores), lam=LAM,
                                 score_sequences=[list(s) for s in scale.sequences])
    out = causal_lm_cot_raft_loss(model, batch, options)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.loss, params)

    # Independent: the gold sequence alone (no node tokens) for CE; each value teacher-forced for p(v).
    nll, n_ce, sq, yhats = 0.0, 0, 0.0, []
    for e in enc:
        end = e.branch_positions[0]
        ids = torch.tensor([e.input_ids[:end]])
        logp = torch.log_softmax(model(ids).logits[0].to(torch.float64), -1)
        labels = torch.tensor(e.labels[:end])
        for t in range(end - 1):
            if labels[t + 1] != -100:
                nll = nll - logp[t, labels[t + 1]]
                n_ce += 1
        prefix = e.input_ids[:e.score_position + 1]
        pv = []
        for seq in scale.sequences:
            lp = torch.log_softmax(model(torch.tensor([prefix + list(seq)]), logits_to_keep=len(seq) + 1)
                                   .logits[0, :-1].to(torch.float64), -1)
            pv.append(sum(lp[i, t] for i, t in enumerate(seq)).exp())
        yhat = sum(v * p for v, p in zip(scale.scores, pv))
        yhats.append(yhat)
        sq = sq + (yhat - e.score) ** 2
    ref = nll / n_ce + LAM * sq / len(enc)
    ref_grads = torch.autograd.grad(ref, params)
    assert out.n_ce_tokens == n_ce and out.n_score_rows == 3
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    assert out.yhat.tolist() == pytest.approx([float(y) for y in yhats], rel=1e-10)
    # Tolerance: the rotary angles are computed in float32 whatever the model's dtype (transformers' Llama), and
    # float32 cos/sin of one position can differ by an ulp between tensors of different lengths (vectorised body
    # against scalar tail); the reference's forwards have other lengths than the batch. That moves float64
    # gradients by about 5e-8 of their largest entry (measured; the CE part alone agrees to 1e-16). A node token
    # at a wrong position or seeing the wrong tokens moves them by O(1).
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=2e-6 * float(r.abs().max()))
    from tract_dist.train.batching import batch_tokens

    assert int(batch_tokens(batch)) == sum(len(e.input_ids) for e in enc)  # the tree mask's real tokens
