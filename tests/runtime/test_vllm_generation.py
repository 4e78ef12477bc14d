"""CoT generation on vLLM: a 2-replica Ray Data pool gives the in-process CoTs, each with its RAIL read-out.
The SIGKILL-then-resume check on vLLM is ``benchmarks/generate/check_vllm_kill_resume.py`` (two more engine starts
than the suite's budget keeps; the suite kills and resumes the same shard logic on HF: tests/generate/test_gen_kill.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from tract_dist.config import load_config
from tract_dist.generate.pipeline import GenerateSpec, generate_cots
from tract_dist.generate.shards import read_generated

pytestmark = [pytest.mark.slow]


def _overrides(data, n_examples, *extra):
    return ["model.name_or_path=smollm2", f"data.train_path={data}", "data.train_format=jsonl",
            "data.max_length=480", f"data.max_examples={n_examples}", "generation.max_new_tokens=6",
            "generation.num_cots=2", "generation.batch_size=2", "generation.shard_size=2", "generation.ray=false",
            "generation.backend=vllm", "tracking.enabled=false", *extra]


def _cots(out):
    recs = read_generated(out)
    counts = Counter(r["uid"] for r in recs)
    assert set(counts.values()) == {1}, counts
    return {r["uid"]: r["cot"] for r in recs}


@pytest.fixture(scope="module")
def clean_out(vllm_engine, quickstart_data, tmp_path_factory):
    """An uninterrupted in-process vLLM run (it reuses the session engine: same spec); its folder."""
    out = tmp_path_factory.mktemp("vllm_clean") / "out"
    summary = generate_cots(GenerateSpec.of(load_config(None, _overrides(quickstart_data, 4))), None, out,
                            show_progress=False)
    assert summary["backend"] == "vllm" and summary["ok"] + summary["failed"] == 8
    return out


@pytest.fixture(scope="module")
def clean_run(clean_out):
    return _cots(clean_out)


def test_vllm_readout_of_each_cot_equals_hf(clean_out, hf_engine, quickstart_examples):
    """The ŷ vLLM stored with each CoT (its follow-up request on the score prefix, #24) is HF's float32
    read-out of the same sequence, within the backends' bound (p_k within 1e-4 relative, ŷ within 5e-4)."""
    from tract_dist.data.encode import EncodeOptions, fit_prompt
    from tract_dist.data.score_tokens import derive_score_tokens, score_prompt_ids

    tok = hf_engine.tokenizer
    st = derive_score_tokens(tok)
    examples = {ex.id: ex for ex in quickstart_examples}
    opts = EncodeOptions(max_length=480)
    recs = [r for r in read_generated(clean_out) if r["status"] == "ok"]
    assert recs
    seqs = [fit_prompt(tok, examples[r["example_id"]], 480 - 6, opts)[0] + score_prompt_ids(tok, r["cot"], st)
            for r in recs]
    for r, p in zip(recs, hf_engine.score_probs(seqs, st.token_ids)):
        assert r["rail_probs"] == pytest.approx(p, rel=1e-4, abs=1e-9)
        assert r["yhat"] == pytest.approx(sum(v * q for v, q in zip(st.scores, p)), abs=5e-4)


@pytest.mark.timeout(400)
def test_two_vllm_replicas_through_ray_data(clean_run, ray_local, quickstart_data, tmp_path):
    cfg = load_config(None, _overrides(quickstart_data, 4, "generation.ray=true", "generation.num_replicas=2",
                                       "cluster.cpus_per_worker=0.5"))
    summary = generate_cots(GenerateSpec.of(cfg), None, tmp_path / "ray", show_progress=False)
    assert summary["missing"] == summary["duplicates"] == 0 and summary["committed"] == 8
    batches = {(r["batch_end_time"], r["batch_seconds"]) for r in read_generated(tmp_path / "ray")}
    assert len(batches) == 4  # four batches of two, spread over the replicas
    assert _cots(tmp_path / "ray") == clean_run  # per-request seeds: the same CoTs whichever replica ran them


