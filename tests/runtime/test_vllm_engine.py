"""The vLLM backend against the HF backend on the real SmolLM2-135M (float32, CPU): seeds, stop strings, prefix
caching, and the RAIL read-out (ŷ within 1e-4 of HF's float64 softmax on the same sequences)."""

from __future__ import annotations

import pytest

from tract_dist.data.prompts import SCORE_PHRASE
from tract_dist.runtime.engine import extract_cot
from tract_dist.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
# vLLM's float32 forward and log-softmax vs HF's float32 forward and float64 softmax: each p_k agrees within
# P_RTOL (measured up to 3.2e-5 relative on cpu-2core, rail read-outs of 6 quickstart examples). ŷ = Σ k p_k with
# k <= 5 and Σ p_k <= 1 then agrees within 5 * P_RTOL absolute (measured up to 6.7e-5 here and 1.1e-4 on the CI
# machine, whose CPU runs other kernels); the bugs this guards against (a wrong position, a missing token,
# renormalising over the score tokens, whose mass is about 0.8 here) move ŷ by more than 1e-2.
P_RTOL = 1e-4
YHAT_ATOL = 5 * P_RTOL


def test_engine_runs_float32(vllm_engine):
    import torch

    assert vllm_engine.llm.llm_engine.model_config.dtype is torch.float32


def test_same_seed_same_cot_on_rerun_any_grouping(vllm_engine, prompts):
    a = vllm_engine.generate(prompts, [11, 22, 33], SAMPLED)
    # another call, regrouped and reordered; the same seed twice in one batch; another seed
    b = vllm_engine.generate([prompts[2], prompts[0], prompts[0], prompts[0]], [33, 11, 11, 12], SAMPLED)
    assert [g.text for g in b[:3]] == [a[2].text, a[0].text, a[0].text]
    assert b[3].text != a[0].text
    assert all(g.new_tokens == 8 or g.finish_reason == "eos" for g in a)


def test_greedy_tokens_equal_hf(vllm_engine, hf_engine, prompts):
    """Independent reference: HF's greedy decoding of the same float32 weights, token for token."""
    v = vllm_engine.generate(prompts, [0, 0, 0], GREEDY)
    h = hf_engine.generate(prompts, [0, 0, 0], GREEDY)
    assert [(g.text, g.new_tokens, g.finish_reason) for g in v] == [(g.text, g.new_tokens, g.finish_reason) for g in h]


def test_stop_strings_agree_with_hf(vllm_engine, hf_engine, prompts):
    free = vllm_engine.generate(prompts[:1], [0], GREEDY)[0]
    ids = vllm_engine.tokenizer.encode(free.text, add_special_tokens=False)
    stop = vllm_engine.tokenizer.decode(ids[2:4]).strip()  # a string the model is known to write mid-way
    assert stop and stop in free.text
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop=(stop, "[RESULT]"))
    v = vllm_engine.generate(prompts[:1], [0], params)[0]
    h = hf_engine.generate(prompts[:1], [0], params)[0]
    assert v.finish_reason == h.finish_reason == "stop" and v.new_tokens < 8
    assert stop in v.text and free.text.startswith(v.text)  # the stop string is kept, like HF's
    assert extract_cot(v.text, params.stop) == extract_cot(h.text, params.stop) == extract_cot(free.text, (stop,))


def test_cots_of_one_prompt_share_its_cached_prefix(vllm_engine, prompts):
    vllm_engine.llm.reset_prefix_cache()
    vllm_engine.generate(prompts[2:3], [1], SAMPLED)
    vllm_engine.generate(prompts[2:3] * 2, [2, 3], SAMPLED)  # two more CoTs of the same prompt
    cached = vllm_engine.last_cached_tokens
    assert all(c > 0 for c in cached) and all(c <= len(prompts[2]) for c in cached), cached
    from tract_dist.data.score_tokens import derive_score_tokens

    suffix = vllm_engine.tokenizer.encode(f" {SCORE_PHRASE} 1", add_special_tokens=False)[:-1]
    score_ids = derive_score_tokens(vllm_engine.tokenizer, (1, 5)).token_ids
    vllm_engine.score_probs([prompts[2] + suffix], score_ids)  # the read-out reuses it too
    assert vllm_engine.last_cached_tokens[0] > 0


def test_score_probs_equal_hf_full_vocabulary(vllm_engine, hf_engine, prompts):
    from tract_dist.data.score_tokens import derive_score_tokens

    st = derive_score_tokens(hf_engine.tokenizer, (1, 5))
    suffix = hf_engine.tokenizer.encode(f" Fine. {SCORE_PHRASE} 1", add_special_tokens=False)[:-1]
    seqs = [p + suffix for p in prompts]
    pv = vllm_engine.score_probs(seqs, st.token_ids)
    ph = hf_engine.score_probs(seqs, st.token_ids)
    for a, b in zip(pv, ph):
        assert a == pytest.approx(b, rel=P_RTOL, abs=1e-12)
        assert sum(k * q for k, q in zip(st.scores, a)) == pytest.approx(sum(k * q for k, q in zip(st.scores, b)),
                                                                       abs=YHAT_ATOL)


def test_multi_token_scale_read_out_equals_hf(vllm_engine, hf_engine, prompts):
    """1-10 with SmolLM2 ("10" is two tokens, "1" ends with EOS): vLLM reads each trie node as the sequence plus
    the node's tokens with logprob_token_ids (exact full-vocabulary probabilities, the nodes share the cached
    prefix), HF computes all nodes in one tree-masked forward; p(v) and ŷ agree as the single-token read-out does."""
    from tract_dist.data.score_scale import derive_score_scale, scale_prompt_ids
    from tract_dist.judge.rail import readouts, trie_probs

    scale = derive_score_scale(hf_engine.tokenizer, "1-10")
    assert not scale.single_token and not hasattr(vllm_engine, "score_trie_probs")
    seqs = [p + scale_prompt_ids(hf_engine.tokenizer, "Fine.", scale) for p in prompts]
    pv, ph = trie_probs(vllm_engine, seqs, scale), trie_probs(hf_engine, seqs, scale)
    for a, b in zip(pv, ph):
        assert a == pytest.approx(b, rel=2 * P_RTOL, abs=1e-12)  # p(v) of a two-token value: two factors
    for rv, rh in zip(readouts(pv, scale.scores), readouts(ph, scale.scores)):
        assert rv.score == pytest.approx(rh.score, abs=2 * YHAT_ATOL)  # values up to 10, not 5


def test_a_stopped_request_is_aborted_and_the_engine_goes_on(vllm_engine, prompts):
    """A request whose stop signal fires mid-generation is aborted in the engine (nothing unfinished is left
    behind), one cancelled before it was queued never runs, the others finish exactly as without signals."""
    from tract_dist.runtime.deadline import StopSignal

    class FiresAfter(StopSignal):
        def __init__(self, reads):
            super().__init__(None)
            self.left = reads

        def reason(self, now=None):
            self.left -= 1
            return "deadline" if self.left < 0 else None

    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    free = vllm_engine.generate(prompts[:2], [0, 0], params)
    cancelled = StopSignal(None)
    cancelled.cancel()
    out = vllm_engine.generate(prompts, [0, 0, 0], params, stops=[None, FiresAfter(3), cancelled])
    assert (out[0].text, out[0].finish_reason) == (free[0].text, free[0].finish_reason)
    assert [(g.finish_reason, g.new_tokens) for g in out[1:]] == [("deadline", 0), ("cancelled", 0)]
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()
    assert vllm_engine.generate(prompts[1:2], [0], params)[0].text == free[1].text  # the abort left no trace
