"""Batched left-padded generation on a tiny model: same tokens as one-by-one, seeds per row, stop strings, and
per-row stop signals (a server's deadline or cancellation)."""

from __future__ import annotations

import time

import pytest

from tract_dist.data.encode import EncodeOptions, fit_prompt
from tract_dist.runtime.deadline import StopSignal
from tract_dist.runtime.hf_engine import HFEngine as Engine
from tract_dist.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_export):
    from tract_dist.models.loading import load_causal_lm, load_tokenizer_for

    return Engine(load_causal_lm(tiny_export), load_tokenizer_for(tiny_export))


@pytest.fixture(scope="module")
def prompts(engine, quickstart_examples):
    # different lengths, so the batch really is left-padded
    return [fit_prompt(engine.tokenizer, ex, budget, EncodeOptions())[0]
            for ex, budget in zip(quickstart_examples[:3], (440, 520, 610))]


def test_batched_greedy_equals_one_by_one(engine, prompts):
    assert len({len(p) for p in prompts}) == 3
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    batched = engine.generate(prompts, [0, 0, 0], params)
    single = [engine.generate([p], [0], params)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.new_tokens == 8 and g.finish_reason == "length" for g in batched)


def test_cpu_row_prefill_matches_the_padded_batch_prefill(engine, prompts, monkeypatch):
    """On CPU a batch of prompts of unequal length is prefilled one row at a time (the causal kernel, no mask)
    into one left-padded cache; decoding from it gives what transformers' padded batch prefill gives."""
    used = []
    shipped = Engine._prefill_rows

    def spy(self, ps, width):
        out = shipped(self, ps, width)
        used.append(out is not None)
        return out

    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    monkeypatch.setattr(Engine, "_prefill_rows", spy)
    rows = engine.generate(prompts, [0, 0, 0], params)
    assert used == [True]
    monkeypatch.setattr(Engine, "_prefill_rows", lambda self, ps, width: None)
    padded = engine.generate(prompts, [0, 0, 0], params)
    assert [g.text for g in rows] == [g.text for g in padded]
    assert [g.new_tokens for g in rows] == [g.new_tokens for g in padded]


def test_sampling_is_reproducible_per_row(engine, prompts):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
    a = engine.generate(prompts, [5, 6, 7], params)
    b = engine.generate([prompts[2], prompts[0]], [7, 5], params)  # regrouped, reordered
    assert [g.text for g in b] == [a[2].text, a[0].text]
    c = engine.generate(prompts[:1], [99], params)
    assert c[0].text != a[0].text  # another seed, another sample


def test_stop_strings_end_generation(engine, prompts):
    free = engine.generate(prompts[:1], [0], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
    ids = engine.tokenizer.encode(free.text, add_special_tokens=False)
    stop = engine.tokenizer.decode(ids[2:4]).strip()  # a string the model is known to produce mid-way
    assert stop and stop in free.text
    cut = engine.generate(prompts[:1], [0], SamplingParams(temperature=0.0, max_new_tokens=8, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.new_tokens < 8
    assert free.text.startswith(cut.text) and stop in cut.text


class _FiresAfter(StopSignal):
    """A stop signal that fires after it has been read ``reads`` times (a deadline, deterministically)."""

    def __init__(self, reads: int):
        super().__init__(None)
        self.left = reads

    def reason(self, now=None):
        self.left -= 1
        return "deadline" if self.left < 0 else super().reason(now)


def test_a_rows_stop_signal_ends_only_that_row(engine, prompts):
    """Row 0 has no signal, row 1's deadline passes mid-generation, row 2 was cancelled before its batch: row 1
    stops where it was (a prefix of its free greedy text), row 0 is exactly what it is alone, row 2 never runs;
    the pad-is-EOS tokenizer (SmolLM2's) does not hide the cut."""
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    free = engine.generate(prompts, [0, 0, 0], params)
    assert all(g.new_tokens == 24 for g in free)
    cancelled = StopSignal(None)
    cancelled.cancel()
    out = engine.generate(prompts, [0, 0, 0], params, stops=[None, _FiresAfter(6), cancelled])
    assert (out[0].text, out[0].new_tokens, out[0].finish_reason) == (free[0].text, 24, "length")
    assert out[1].finish_reason == "deadline" and 0 < out[1].new_tokens < 24
    assert free[1].text.startswith(out[1].text)
    assert (out[2].text, out[2].new_tokens, out[2].finish_reason) == ("", 0, "cancelled")
    past = StopSignal(time.monotonic() - 1)  # a deadline already passed: nothing runs
    assert engine.generate(prompts[:1], [0], params, stops=[past])[0].finish_reason == "deadline"


def test_read_out_after_generate_reuses_the_prompt_cache_exactly(tiny_export, prompts):
    """CoT-RAIL's read-out of prompt + CoT + suffix right after generating the CoT reuses the prompt's keys and
    values cut out of the left-padded batch (#23): in float64 it equals the full forward pass to 1e-12."""
    import torch

    from tract_dist.models.loading import load_causal_lm, load_tokenizer_for
    from tract_dist.runtime.hf_engine import score_token_probs

    model = load_causal_lm(tiny_export, dtype=torch.float64)
    engine = Engine(model, load_tokenizer_for(tiny_export), batch_size=2)  # two generate batches, one padded
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    engine.generate(prompts, [1, 2, 3], params)
    assert not engine._prefixes  # generation alone keeps nothing; a Judge asks for it
    from tract_dist.judge.judge import Judge

    Judge(engine=engine)
    assert engine.keep_prompt_cache is True
    gens = engine.generate(prompts, [1, 2, 3], params)
    suffix = engine.tokenizer.encode(" So the overall score is", add_special_tokens=False)
    seqs = [p + engine.tokenizer.encode(g.text, add_special_tokens=False) + suffix for p, g in zip(prompts, gens)]
    seqs.append(prompts[0][:50] + suffix)  # extends no generated prompt: read in full
    token_ids = engine.tokenizer.convert_tokens_to_ids(["1", "2", "3", "4", "5"])
    assert len(engine._prefixes) == 3
    calls = []
    forward = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        got = engine.score_probs(seqs, token_ids)
    finally:
        model.forward = forward
    assert [c[1] for c in calls[:3]] == [len(s) - len(p) for s, p in zip(seqs, prompts)]  # new tokens only
    want = score_token_probs(model, seqs, token_ids, pad_id=engine.pad_id)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15)
    assert not engine._prefixes  # released once read out
