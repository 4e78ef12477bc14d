"""generate_cots in-process: sharded output, resumption after an interruption, failures recorded, stage 2."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from gen_helpers import gen_config

from tract_dist.generate import pipeline
from tract_dist.runtime.engine import Generation
from tract_dist.runtime.hf_engine import HFEngine as Engine
from tract_dist.generate.shards import StaleGenerationError, read_generated
from tract_dist.generate.stage2 import build_stage2_dataset

pytestmark = [pytest.mark.usefixtures("migrated_mlflow_db")]


def _by_uid(out_dir) -> dict[str, dict]:
    records = read_generated(out_dir)
    counts = Counter(r["uid"] for r in records)
    assert max(counts.values()) == 1, f"duplicated uids: {[u for u, c in counts.items() if c > 1]}"
    return {r["uid"]: r for r in records}


@pytest.fixture(scope="module")
def clean_run(tiny_export, quickstart_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    cfg = gen_config(tiny_export, quickstart_data, tmp)
    summary = pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, tmp / "out", show_progress=False)
    return cfg, tmp / "out", summary


def test_complete_run_writes_every_cot_once(clean_run, quickstart_examples):
    cfg, out, summary = clean_run
    recs = _by_uid(out)
    want = {f"{ex.id}#cot{j}" for ex in quickstart_examples[:5] for j in range(2)}
    assert set(recs) == want
    assert summary["expected"] == summary["committed"] == 10
    assert summary["missing"] == summary["duplicates"] == summary["unexpected"] == 0
    assert summary["ok"] + summary["failed"] == 10
    assert summary["shards"] == 4  # shard_size 3: 3 + 3 + 3 + 1
    assert all(r["status"] == "ok" and r["cot"] and r["new_tokens"] == 6 for r in recs.values())
    assert all(r["prompt_tokens"] <= 640 - 6 for r in recs.values())
    assert recs["0#cot0"]["cot"] != recs["0#cot1"]["cot"]  # two samples, two seeds
    assert not list(out.glob(".*.tmp"))


def test_each_cot_carries_its_rail_readout(clean_run, tiny_export, quickstart_examples):
    """The ŷ stored with each CoT is the model's read-out of ``<prompt><CoT> So the overall score is``,
    recomputed here by a plain unbatched forward pass of the same export (no engine code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tract_dist.data.encode import EncodeOptions, fit_prompt
    from tract_dist.data.prompts import render_target

    cfg, out, _ = clean_run
    model = AutoModelForCausalLM.from_pretrained(tiny_export, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_export)
    ids = [tok.encode(f"So the overall score is {k}", add_special_tokens=False)[-1] for k in range(1, 6)]
    opts = EncodeOptions(max_length=640, system_prompt=cfg.data.system_prompt)
    examples = {ex.id: ex for ex in quickstart_examples[:5]}
    for r in _by_uid(out).values():
        prompt, _ = fit_prompt(tok, examples[r["example_id"]], 640 - 6, opts)
        target = tok.encode(render_target(r["cot"], 1), add_special_tokens=False)[:-1]  # up to the score token
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0, -1].double()
        p = torch.softmax(logits, -1)[ids]
        assert r["rail_probs"] == pytest.approx(p.tolist(), rel=1e-4, abs=1e-9)
        assert r["yhat"] == pytest.approx(float(p @ torch.arange(1, 6, dtype=torch.float64)), rel=1e-4)
        assert r["rail_mass"] == pytest.approx(float(p.sum()), rel=1e-4)


def test_rerun_of_a_complete_folder_generates_nothing(clean_run, tiny_export):
    cfg, out, _ = clean_run
    before = sorted(p.name for p in out.glob("part-*.jsonl"))
    summary = pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)
    assert summary["this_run"]["generated_this_run"] == 0
    assert sorted(p.name for p in out.glob("part-*.jsonl")) == before


def test_interrupted_run_resumes_to_the_same_output(clean_run, tiny_export, quickstart_data, tmp_path, monkeypatch):
    cfg, clean_out, _ = clean_run
    real_map = pipeline.map_rows

    def dies_after_two_batches(*args, **kwargs):
        for n, batch in enumerate(real_map(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt("simulated kill")
            yield batch

    monkeypatch.setattr(pipeline, "map_rows", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, tmp_path / "out", show_progress=False)
    partial = _by_uid(tmp_path / "out")
    assert len(partial) == 6  # the two finished batches were committed, nothing else
    monkeypatch.setattr(pipeline, "map_rows", real_map)
    summary = pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, tmp_path / "out", show_progress=False)
    assert summary["this_run"]["generated_this_run"] == 4
    resumed = _by_uid(tmp_path / "out")
    clean = _by_uid(clean_out)
    assert set(resumed) == set(clean)
    # per-example seeds: the resumed CoTs are the ones an uninterrupted run writes
    assert {u: r["cot"] for u, r in resumed.items()} == {u: r["cot"] for u, r in clean.items()}


def test_failures_are_recorded_with_reasons(tiny_export, quickstart_data, tmp_path, monkeypatch):
    cfg = gen_config(tiny_export, quickstart_data, tmp_path, "data.max_examples=4", "generation.num_cots=1")
    real_generate = Engine.generate

    def flaky(self, prompts, seeds, params):
        if len(prompts) > 1:
            raise RuntimeError("batch blew up")  # forces the row-by-row retry
        if seeds[0] == bad_seeds["boom"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        if seeds[0] == bad_seeds["empty"]:
            return [Generation(text="  [RESULT] 3", new_tokens=3, finish_reason="stop")]
        return real_generate(self, prompts, seeds, params)

    from tract_dist.runtime.sampling import example_seed

    bad_seeds = {"boom": example_seed(0, "1", 0), "empty": example_seed(0, "2", 0)}
    monkeypatch.setattr(Engine, "generate", flaky)
    summary = pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, tmp_path / "out", show_progress=False)
    # The error is retried until generation.max_attempts (3) tries in all; the empty CoT is final at once
    # (its seed gives the same text every time): 4 records + 2 retries.
    assert summary["committed"] == 6 and summary["ok"] == 2 and summary["failed"] == 2
    assert summary["retried"] == 2 and summary["failed_final"] == 2 and summary["failed_retryable"] == 0
    assert summary["failure_reasons"] == {"empty_cot": 1,
                                          "error: RuntimeError: CUDA out of memory (simulated)": 1}
    failures = [json.loads(x) for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["uid"] for f in failures) == ["1#cot0", "2#cot0"]
    assert {f["uid"]: f["attempts"] for f in failures} == {"1#cot0": 3, "2#cot0": 1}
    assert sorted(r["attempt"] for r in read_generated(tmp_path / "out") if r["uid"] == "1#cot0") == [1, 2, 3]

    from tract_dist.generate.pipeline import load_training_examples

    stats = build_stage2_dataset(tmp_path / "out", load_training_examples(cfg.data), tmp_path / "stage2.jsonl")
    assert stats["written"] == 2 and stats["examples_without_cot"] == 2
    assert sorted(stats["examples_without_cot_ids"]) == ["1", "2"]
    assert stats["unusable_reasons"] == {"generation_failed: empty_cot": 1,
                                         "generation_failed: error: RuntimeError: CUDA out of memory (simulated)": 1}


def test_settings_change_is_refused(clean_run, tiny_export, quickstart_data):
    _, out, _ = clean_run
    cfg = gen_config(tiny_export, quickstart_data, out.parent, "generation.temperature=0.5")
    with pytest.raises(StaleGenerationError, match="temperature") as ei:
        pipeline.generate_cots(pipeline.GenerateSpec.of(cfg), tiny_export, out, show_progress=False)
    old = json.loads((out / "settings.json").read_text())["fingerprint"]
    assert f"fingerprint {old}; this run's is " in str(ei.value) and "--fresh" in str(ei.value)


def test_stage2_dataset_pairs_cots_with_gold(clean_run, quickstart_examples, tmp_path):
    from tract_dist.data.formats import read_examples
    from tract_dist.data.prompts import render_target

    _, out, _ = clean_run
    stats = build_stage2_dataset(out, quickstart_examples[:5], tmp_path / "stage2.jsonl")
    assert stats["written"] == 10 and stats["examples_without_cot"] == 0 and stats["unusable"] == 0
    back = read_examples(str(tmp_path / "stage2.jsonl"), "jsonl").examples  # the training reader accepts it
    gen = _by_uid(out)
    gold = {ex.id: ex for ex in quickstart_examples[:5]}
    assert [e.id for e in back] == [f"{ex.id}#cot{j}" for ex in quickstart_examples[:5] for j in range(2)]
    for e in back:
        src = gold[e.id.split("#")[0]]
        assert e.feedback == gen[e.id]["cot"]
        assert e.score == src.score and e.instruction == src.instruction and e.response == src.response
        assert render_target(e.feedback, e.score).endswith(f"So the overall score is {int(src.score + 0.5)}")


@pytest.mark.parametrize("rule", ["nearest", "weighted"])
def test_stage2_selection_on_stored_readouts(clean_run, quickstart_examples, tmp_path, rule):
    from tract_dist.data.formats import read_examples
    from tract_dist.generate.select import SelectionSpec

    _, out, _ = clean_run
    gen = _by_uid(out)
    spec = SelectionSpec(rule, tolerance=0.5, fallback="nearest")
    stats = build_stage2_dataset(out, quickstart_examples[:5], tmp_path / "s2.jsonl", spec,
                                 score_values=[1, 2, 3, 4, 5])
    back = read_examples(str(tmp_path / "s2.jsonl"), "jsonl").examples
    sel = stats["selection"]
    assert sel["cots_before"] == 10 and sel["rule"] == rule and stats["written"] == sel["kept"] == len(back)
    if rule == "nearest":
        for ex in quickstart_examples[:5]:
            errs = {j: abs(gen[f"{ex.id}#cot{j}"]["yhat"] - ex.score) for j in range(2)}
            want = min(errs, key=lambda j: (errs[j], j))
            assert [e.id for e in back if e.id.startswith(f"{ex.id}#")] == [f"{ex.id}#cot{want}"]
        assert all(e.weight is None for e in back) and "weight" not in (tmp_path / "s2.jsonl").read_text()
    else:  # every CoT, weights written and read back; mean 1 per prompt
        assert len(back) == 10 and all(e.weight is not None for e in back)
        for ex in quickstart_examples[:5]:
            assert sum(e.weight for e in back if e.id.startswith(f"{ex.id}#")) == pytest.approx(2.0)
