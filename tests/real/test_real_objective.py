"""REAL's loss (#25) against its gradient written out independently in float64.

Fixed "sampled" CoTs of real token ids (quickstart feedbacks cut to different lengths, SmolLM2's tokenizer, the
project's REAL encoder) on a tiny float64 Llama with SmolLM2's vocabulary; from the full (B, T, V) logits, by
plain autograd and no code of the loss or REAL packages:
  - the RLOO policy-gradient estimator  -(1/N) Σ_i A_i ∇ Σ_{t∈c_i} log π(c_it),  A_i = r_i - mean_{j≠i} r_j,
    r_i = -(ŷ_i - y)^2 (advantages by explicit loops);
  - the refinement gradient  λ ∇ Σ_i (ŷ_i - y)^2 / M;
  - the PPO-clipped surrogate and the k3 KL term at a moved policy;
each compared with the gradient of the project's loss (fused and reference) built from surrogate_token_weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tract_dist.data.encode import EncodeOptions
from tract_dist.data.score_tokens import derive_score_tokens
from tract_dist.loss.options import CoTRaftLossOptions
from tract_dist.models import causal_lm_cot_raft_loss
from tract_dist.real.advantages import regression_rewards, rloo_advantages, tied_prompts
from tract_dist.real.batch import RealEncoder, RealSample, collate_samples
from tract_dist.real.objective import k3_kl, surrogate_token_weights

K = 3  # samples per prompt
WORDS = [[5, 9, 2], [7, 3, 11]]  # CoT lengths (words) of each prompt's samples
PROMPT_TAIL = 4  # prompt tokens kept before each CoT (gradients do not need the whole prompt)
LAM = 0.7
# Relative tolerance on gradients: transformers' LlamaRMSNorm computes in float32 even in a float64 model, so the
# backward carries float32 roundings (~1e-7 relative); any error in the estimator (a normalisation, a sign, a
# baseline) is orders of magnitude larger.
TOL = 1e-6


def test_rloo_advantages_sum_to_zero_and_match_the_definition():
    g = torch.Generator().manual_seed(3)
    r = -torch.rand(5, 4, generator=g, dtype=torch.float64) * 9
    r[2] = -1.25  # a prompt whose samples all tie
    a = rloo_advantages(r)
    for p in range(5):
        for i in range(4):
            others = [r[p, j].item() for j in range(4) if j != i]
            assert a[p, i].item() == pytest.approx(r[p, i].item() - sum(others) / 3, abs=1e-12)
    assert torch.allclose(a.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert tied_prompts(r).tolist() == [False, False, True, False, False]
    assert torch.equal(a[2], torch.zeros(4, dtype=torch.float64))
    n = rloo_advantages(r, norm="std", clip=1.0)  # REAL's official normalisation
    ref = a / (a.std(1, unbiased=False, keepdim=True) + 1e-8)
    assert torch.allclose(n, ref.clamp(-1, 1)) and torch.equal(n[2], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(n.sum(1)[[0, 1, 3, 4]], torch.zeros(4, dtype=torch.float64), atol=1.0)  # clamp breaks it
    assert torch.equal(regression_rewards(torch.tensor([2.5]), torch.tensor([4.0])), torch.tensor([-2.25]))
    with pytest.raises(ValueError):
        rloo_advantages(r[:, :1])


@pytest.fixture(scope="module")
def problem(tokenizers, quickstart_examples):
    from tract_dist.models.tiny import build_tiny_model, tiny_llama_config

    tok = tokenizers["smollm2"]
    st = derive_score_tokens(tok)
    enc = RealEncoder(tok, st, EncodeOptions(max_length=4096), max_new_tokens=64)
    samples = []
    for p, (ex, lengths) in enumerate(zip(quickstart_examples[:2], WORDS)):
        prompt = enc.prompt_ids(ex)[-PROMPT_TAIL:]
        for j, n in enumerate(lengths):
            src = quickstart_examples[2 + 3 * p + j].feedback.split()
            ids, labels, lead = enc.sample_row(prompt, " ".join(src[:n]))
            assert lead  # the score phrase's tokens are the tail and masked
            samples.append(RealSample(prompt=p, input_ids=ids, labels=labels, score_position=len(ids) - 1,
                                      score=float(ex.score), yhat=0.0, old_logprobs=[0.0] * len(ids),
                                      new_tokens=n, finish_reason="stop"))
    model = build_tiny_model(tiny_llama_config(len(tok), hidden_size=16, num_layers=1, num_heads=2,
                                               num_kv_heads=1, intermediate_size=32), seed=1, dtype=torch.float64)
    return model, samples, st, tok


def _independent(model, batch, st):
    """Per sequence: Σ log π over its CoT labels, and ŷ from the full-vocabulary softmax (float64 autograd)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, values = torch.tensor(st.token_ids), torch.tensor(st.scores, dtype=torch.float64)
    logp_seq, yhat, tok_logp = [], [], torch.zeros(batch["labels"].shape, dtype=torch.float64)
    for s in range(logits.shape[0]):
        tgt = batch["labels"][s, 1:]
        lp = F.log_softmax(logits[s, :-1], -1)
        keep = tgt != -100
        per_tok = lp[keep].gather(1, tgt[keep].unsqueeze(1)).squeeze(1)
        logp_seq.append(per_tok.sum())
        tok_logp[s, 1:][keep] = per_tok.detach()
        yhat.append(torch.softmax(logits[s, batch["score_positions"][s]], -1)[ids] @ values)
    return torch.stack(logp_seq), torch.stack(yhat), tok_logp


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


def _ours(model, batch, st, w, lam, impl):
    opts = CoTRaftLossOptions(score_token_ids=st.token_ids, score_values=st.scores, lam=1.0, impl=impl)
    n_tok = int((batch["labels"] != -100).sum())
    out = causal_lm_cot_raft_loss(model, {**batch, "ce_token_weights": w}, opts, ce_denominator=n_tok,
                                  mse_denominator=batch["labels"].shape[0], lam=lam)
    return out


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_loss_gradient_is_rloo_policy_gradient_plus_refinement(problem, impl):
    model, samples, st, tok = problem
    batch = collate_samples(samples, [0.0] * len(samples), tok.pad_token_id)
    mask = batch["labels"] != -100
    n_tok, m = int(mask.sum()), len(samples)
    y = batch["score_targets"].double()

    logp_seq, yhat, tok_logp = _independent(model, batch, st)
    r = -(yhat.detach() - y) ** 2
    adv = torch.zeros(m, dtype=torch.float64)
    for i in range(m):  # leave-one-out by hand, within each prompt's K samples
        mates = [j for j in range(m) if samples[j].prompt == samples[i].prompt and j != i]
        adv[i] = r[i] - sum(r[j] for j in mates) / len(mates)
    assert torch.allclose(rloo_advantages(r.view(2, K)).flatten(), adv, atol=1e-14)

    g_pg = _grads(model, -(adv * logp_seq).sum() / n_tok)
    _, yhat2, _ = _independent(model, batch, st)
    g_ref = _grads(model, LAM * ((yhat2 - y) ** 2).sum() / m)
    assert g_pg.abs().max() > 1e-6 and g_ref.abs().max() > 1e-6

    on = surrogate_token_weights(adv, mask)
    # policy gradient alone (λ = 0)
    out = _ours(model, batch, st, on.weights, 0.0, impl)
    assert torch.allclose(out.yhat, yhat.detach(), atol=1e-12)
    g = _grads(model, out.loss)
    assert (g - g_pg).abs().max() <= TOL * g_pg.abs().max()
    # refinement alone (every advantage 0)
    g = _grads(model, _ours(model, batch, st, on.weights * 0, LAM, impl).loss)
    assert (g - g_ref).abs().max() <= TOL * g_ref.abs().max()
    # both
    g = _grads(model, _ours(model, batch, st, on.weights, LAM, impl).loss)
    assert (g - g_pg - g_ref).abs().max() <= TOL * (g_pg + g_ref).abs().max()

    # the clipped-ratio path at an unmoved policy (old = current log-probs) is the unclipped one, exactly
    cur = _ours_logprobs(model, batch, st)
    assert torch.allclose(cur, tok_logp, atol=1e-12)  # the trainer's no-grad log-probs
    clipped = surrogate_token_weights(adv, mask, logp=cur, old_logp=cur.clone(), clip_eps=0.2)
    assert torch.equal(clipped.weights, on.weights) and clipped.clipped.item() == 0
    assert clipped.surrogate.item() == pytest.approx(on.surrogate.item(), abs=1e-12)


def _ours_logprobs(model, batch, st):
    from tract_dist.models import CotRaftCausalLM

    opts = CoTRaftLossOptions(score_token_ids=st.token_ids, score_values=st.scores, impl="reference")
    wrapper = CotRaftCausalLM(model, opts)
    with torch.no_grad():
        return wrapper(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                       score_positions=batch["score_positions"], score_targets=batch["score_targets"],
                       token_logprobs=True)


def test_clipped_surrogate_and_k3_kl_gradients_at_a_moved_policy(problem):
    """Old and reference log-probs differ from the current ones (as after an update): the token weights give the
    autograd gradient of -Σ min(ρA, clip(ρ)A)/N (some tokens clipped each way) and of β Σ k3/N, separately."""
    model, samples, st, tok = problem
    batch = collate_samples(samples, [0.0] * len(samples), tok.pad_token_id)
    mask = batch["labels"] != -100
    n_tok = int(mask.sum())
    g = torch.Generator().manual_seed(7)
    adv = torch.tensor([0.9, -0.4, -0.5, 1.3, -0.2, -1.1], dtype=torch.float64)
    _, _, cur = _independent(model, batch, st)
    old = (cur + torch.randn(cur.shape, generator=g, dtype=torch.float64) * 0.3) * mask
    ref = (cur + torch.randn(cur.shape, generator=g, dtype=torch.float64) * 0.2) * mask
    eps, beta = 0.2, 0.05

    def token_logp():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.zeros(batch["labels"].shape, dtype=torch.float64)
        lp = lp.clone()
        out = []
        for s in range(logits.shape[0]):
            tgt = batch["labels"][s, 1:].clamp(min=0)
            row = F.log_softmax(logits[s, :-1], -1).gather(1, tgt.unsqueeze(1)).squeeze(1)
            out.append(torch.cat([row.new_zeros(1), row]))
        return torch.stack(out) * mask

    lp = token_logp()
    ratio = torch.exp(lp - old)
    a = adv[:, None]
    ppo = -(torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a) * mask).sum() / n_tok
    g_ppo = _grads(model, ppo)
    g_kl = _grads(model, beta * (k3_kl(token_logp(), ref) * mask).sum() / n_tok)

    w = surrogate_token_weights(adv, mask, logp=cur, old_logp=old, clip_eps=eps)
    assert 0 < w.clipped.item() < mask.sum().item()
    assert w.surrogate.item() / n_tok == pytest.approx(ppo.item(), rel=1e-12)
    g = _grads(model, _ours(model, batch, st, w.weights, 0.0, "fused").loss)
    assert (g - g_ppo).abs().max() <= TOL * g_ppo.abs().max()

    wk = surrogate_token_weights(adv * 0, mask, logp=cur, ref_logp=ref, beta=beta)
    g = _grads(model, _ours(model, batch, st, wk.weights, 0.0, "fused").loss)
    assert (g - g_kl).abs().max() <= TOL * g_kl.abs().max()
    assert wk.kl.item() > 0
