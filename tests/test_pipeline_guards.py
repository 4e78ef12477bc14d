"""The pipeline's guards, checked before (or instead of) any stage: one invocation at a time, a corrupt
state.json named, a parent MLflow run that no longer exists replaced, stage folders named by fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tract_dist.cli import main
from tract_dist.config import load_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("migrated_mlflow_db")]


def _cfg(tmp: Path, data: Path, **over):
    base = {
        "model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
        "data": {"train_path": str(data), "train_format": "jsonl", "max_examples": 4},
        "pipeline": {"method": "cot_raft", "output_dir": str(tmp / "pipe")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "guards"},
        "cluster": {"launcher": "inline"}, "generation": {"ray": False}, "evaluation": {"ray": False},
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()], base=base)


def _write(tmp: Path, cfg) -> Path:
    p = tmp / "pipe.yaml"
    p.write_text(json.dumps(cfg.model_dump()))
    return p


def test_second_pipeline_invocation_is_refused_naming_the_holder(tmp_path, quickstart_data, capsys, lock_holder):
    cfg_file = _write(tmp_path, _cfg(tmp_path, quickstart_data))
    with lock_holder(tmp_path / "pipe" / "p", "pipeline") as pid:
        assert main(["pipeline", str(cfg_file), "--name", "p"]) == 2
        err = capsys.readouterr().err
        assert f"pipeline {tmp_path / 'pipe' / 'p'} is in use by pid {pid}" in err
        assert "Traceback" not in err


def test_corrupt_state_json_is_named(tmp_path, quickstart_data, capsys):
    cfg_file = _write(tmp_path, _cfg(tmp_path, quickstart_data))
    state = tmp_path / "pipe" / "p" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"stages": {"train_stage1": {"finger')
    assert main(["pipeline", str(cfg_file), "--name", "p"]) == 2
    err = capsys.readouterr().err
    assert f"{state}: the pipeline state is corrupt" in err and "Traceback" not in err


def test_deleted_parent_run_is_replaced_and_recorded(tmp_path, quickstart_data, capsys, monkeypatch):
    """All stages up to date, the parent run id in state.json unknown to the store: a new parent run, a
    warning, and the new id recorded."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from tract_dist.pipeline import plan_pipeline, run_pipeline

    cfg = _cfg(tmp_path, quickstart_data)
    pdir = tmp_path / "pipe" / "p"
    pdir.mkdir(parents=True)
    s1_fp = plan_pipeline(cfg, name="p")["train_stage1"].fingerprint
    model = pdir / "model"
    model.mkdir()
    (pdir / "state.json").write_text(json.dumps({
        "parent_run_id": "0123456789abcdef0123456789abcdef",
        "stages": {"train_stage1": {"fingerprint": s1_fp, "outputs": {"model": str(model), "summary": "4"},
                                    "paths": [str(model)]}}}))
    s = run_pipeline(cfg, name="p")
    assert s.stages["train_stage1"]["status"] == "skipped"
    assert "no longer exists" in capsys.readouterr().err
    new_id = json.loads((pdir / "state.json").read_text())["parent_run_id"]
    assert new_id == s.parent_run_id != "0123456789abcdef0123456789abcdef"
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(new_id)
    assert run.info.status == "FINISHED" and run.data.params["pipeline.name"] == "p"


REPO = Path(__file__).resolve().parents[1]

# The stage fingerprints a pipeline folder of this config records (state.json, folder names), as the pipeline has
# made them since before the stage list (#24's selection keys, #26's inference context and #28's thinking switch
# all left them as they were). Literal, so a change to what any stage hashes, or how, fails here: every existing
# folder would re-run from scratch. The data path is relative to the checkout and the output folder a fixed path
# the plan never creates, so the digests are the same in any clone.
PINNED = {"train_stage1": "1d5b5358b253", "generate": "a3732271e36a", "build_stage2": "c8618b60fde7",
          "train_stage2": "0aaefd2d172c", "evaluate_stage1_v_cot_rail": "6fa31990a368",
          "evaluate_stage2_v_cot_rail": "4ed56a42654f"}


def _pinned_cfg(tmp: Path, **over):
    data = "data/quickstart/vicuna_eval_0-15.jsonl"
    return _cfg(tmp, Path(data), **{"pipeline.method": "tract", "pipeline.output_dir": "/tract-dist-pinned/pipe",
                                    "evaluation.benchmarks": [{"name": "v", "path": data, "format": "jsonl",
                                                               "max_examples": 3}], **over})


def test_stage_list_keeps_the_fingerprints_of_existing_pipeline_folders(tmp_path, monkeypatch):
    """Stage names, order and the recorded fingerprints; which settings re-run which stages."""
    from tract_dist.pipeline import plan_pipeline

    monkeypatch.chdir(REPO)
    plan = plan_pipeline(_pinned_cfg(tmp_path), name="p")
    assert {k: v.fingerprint for k, v in plan.items()} == PINNED
    assert list(plan) == ["train_stage1", "generate", "build_stage2", "train_stage2",
                          "evaluate_stage1_v_cot_rail", "evaluate_stage2_v_cot_rail"]
    assert {v.status for v in plan.values()} == {"to run"}
    assert not Path("/tract-dist-pinned").exists()
    # a selection rule is the stage-2 data's business: the CoTs (and stage 1) keep their fingerprints
    sel = plan_pipeline(_pinned_cfg(tmp_path, **{"generation.select": "nearest"}), name="p")
    assert [sel[k].fingerprint == plan[k].fingerprint for k in plan] == [True, True, False, False, True, False]
    # a λ warm-up is a training setting (and 0, its default, hashes as configs before it did)
    assert plan_pipeline(_pinned_cfg(tmp_path, **{"loss.lam_warmup_steps": 3}),
                         name="p")["train_stage1"].fingerprint != PINNED["train_stage1"]
    # the template's thinking switch changes every prompt: all stages (its default hashes as before: above)
    think = plan_pipeline(_pinned_cfg(tmp_path, **{"data.enable_thinking": True}), name="p")
    assert all(think[k].fingerprint != plan[k].fingerprint for k in plan)

    def changed(**over):  # which stages a setting re-runs (#26's keys)
        other = plan_pipeline(_pinned_cfg(tmp_path, **over), name="p")
        return [k for k in plan if other[k].fingerprint != plan[k].fingerprint]

    # how a step's samples are laid out changes no result: a run may switch it, and resume
    assert changed(**{"training.packing": True, "training.max_tokens_per_micro_batch": 4096,
                      "training.group_by_length": True}) == []
    assert "train_stage1" in changed(**{"training.global_batch_size": 4})  # another step plan
    assert changed(**{"evaluation.sample_single_cot": True}) == ["evaluate_stage1_v_cot_rail",
                                                                 "evaluate_stage2_v_cot_rail"]
    assert "generate" in changed(**{"generation.max_length": 2048})


def _recorded_stage1(tmp_path, cfg) -> Path:
    """state.json holding a finished stage 1 (its model folder exists), as a first invocation leaves it."""
    from tract_dist.pipeline import plan_pipeline

    pdir = tmp_path / "pipe" / "p"
    model = pdir / "model"
    model.mkdir(parents=True)
    fp = plan_pipeline(cfg, name="p")["train_stage1"].fingerprint
    (pdir / "state.json").write_text(json.dumps({"stages": {"train_stage1": {
        "fingerprint": fp, "outputs": {"model": str(model), "run_dir": "", "summary": "4"}, "paths": [str(model)]}}}))
    return model


def test_a_stage_subset_uses_the_recorded_stages_and_refuses_missing_inputs(tmp_path, quickstart_data, capsys):
    from tract_dist.pipeline import plan_pipeline

    bench = [{"name": "vicuna", "path": str(quickstart_data), "format": "jsonl"}]
    cfg = _cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "pipeline.stages": ["generate"],
                                             "evaluation.benchmarks": bench})
    plan = plan_pipeline(cfg, name="p")
    assert [plan[k].status for k in ("train_stage1", "generate", "build_stage2")] == [
        "not selected", "waiting", "waiting"]
    cfg_file = _write(tmp_path, cfg)
    assert main(["pipeline", str(cfg_file), "--name", "p"]) == 2  # before anything runs
    err = capsys.readouterr().err
    assert "pipeline.stages: stage generate needs train_stage1, which has not run" in err and "Traceback" not in err
    assert not (tmp_path / "pipe" / "p" / "state.json").exists()

    _recorded_stage1(tmp_path, cfg)
    plan = plan_pipeline(cfg, name="p")
    assert [plan[k].status for k in ("train_stage1", "generate", "build_stage2", "train_stage2")] == [
        "up to date", "to run", "not selected", "waiting"]
    every_eval = _cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "pipeline.stages": ["evaluate_*"],
                                                    "evaluation.benchmarks": bench})
    assert {k: v.status for k, v in plan_pipeline(every_eval, name="p").items() if k.startswith("evaluate")} == {
        "evaluate_stage1_vicuna_cot_rail": "to run", "evaluate_stage2_vicuna_cot_rail": "waiting"}

    typo = _write(tmp_path, _cfg(tmp_path, quickstart_data, **{"pipeline.stages": ["evaluate_stage3*"]}))
    assert main(["pipeline", str(typo), "--name", "p"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.stages: 'evaluate_stage3*' matches no stage of this pipeline (train_stage1)" in err


def test_stage1_export_replaces_stage1_and_is_fingerprinted_by_content(tmp_path, quickstart_data, capsys):
    from tract_dist.pipeline import plan_pipeline

    export = tmp_path / "export" / "model"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"weights-1")
    cfg = _cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "pipeline.stage1_export": str(export),
                                             "pipeline.evaluate_stage1": False, "evaluation.benchmarks": [
                                                 {"name": "vicuna", "path": str(quickstart_data), "format": "jsonl"}]})
    plan = plan_pipeline(cfg, name="p")
    assert list(plan) == ["stage1_export", "generate", "build_stage2", "train_stage2", "evaluate_stage2_vicuna_cot_rail"]
    # by the folder's content, not its path (literal: what folders made with an export recorded)
    assert plan["stage1_export"].fingerprint == "175254be1271"
    gen = plan["generate"].fingerprint
    (export / "model.safetensors").write_bytes(b"weights-2")  # another model at the same path: other CoTs
    assert plan_pipeline(cfg, name="p")["generate"].fingerprint != gen

    for bad, why in ((tmp_path / "nope", "is not a folder"), (tmp_path / "export", "holds no config.json")):
        cfg_file = _write(tmp_path, _cfg(tmp_path, quickstart_data, **{"pipeline.stage1_export": str(bad)}))
        assert main(["pipeline", str(cfg_file), "--name", "p"]) == 2
        err = capsys.readouterr().err
        assert f"pipeline.stage1_export: '{bad}' {why}" in err and "Traceback" not in err


def test_threads_per_replica_reaches_the_inference_pool(tmp_path, quickstart_data, monkeypatch):
    """cluster.threads_per_replica wins; otherwise a machine's cores are shared out among the Ray replicas on CPU
    (literal counts on a faked core count, not the formula again)."""
    import tract_dist.runtime.pool as pool

    for use_ray in (False, True):
        cfg = _cfg(tmp_path, quickstart_data, **{"cluster.threads_per_replica": 1})
        assert pool.PoolSpec.from_cluster(cfg.cluster, use_ray=use_ray, batch_size=2).torch_threads() == 1
    for cores, workers, use_ray, expected in ((8, 2, True, 4), (8, 3, True, 2), (1, 2, True, 1), (8, 2, False, 8),
                                              (2, 1, True, 2)):
        monkeypatch.setattr(pool.os, "cpu_count", lambda c=cores: c)
        spec = pool.PoolSpec.from_cluster(_cfg(tmp_path, quickstart_data, **{"cluster.num_workers": workers}).cluster,
                                          use_ray=use_ray, batch_size=2)
        assert spec.torch_threads() == expected, (cores, workers, use_ray)


@pytest.mark.timeout(600)
def test_relative_pipeline_end_to_end(tmp_path, quickstart_examples, vicuna_path, monkeypatch):
    """data.task relative (#29 item 4) through the pipeline on CPU, inline (no Ray): stage 1 trains the tiny model
    on pairs ({feedback} [RESULT] A|B, p(A) regressed on y), then evaluates it on Vicuna paired by gold-score
    difference in both orders; the evaluation run and the pipeline's run carry accuracy and position agreement.
    The training pairs are the quickstart's responses paired by gold score with a templated comparison as
    feedback (the test checks the plumbing, not a judge's quality). The tract method is refused for pairs."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from tract_dist.config import ConfigError
    from tract_dist.data.pair_formats import pairs_from_absolute
    from tract_dist.pipeline import run_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    made = pairs_from_absolute(quickstart_examples, min_gap=0.5)
    pairs = made + [replace(p.swapped(), id=f"{p.id}-swapped") for p in made]  # both orders: y = 1 and 0
    assert len(pairs) >= 4  # data.max_examples=4 of them train
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps({**p.to_dict(), "feedback": "Response A and Response B differ in detail."})
                             + "\n" for p in pairs))
    bench = [{"name": "vpairs", "path": str(vicuna_path), "format": "vicuna-pairs", "max_examples": 2}]
    cfg = _cfg(tmp_path, train, **{"data.task": "relative", "data.train_format": "pairs-jsonl",
                                   "data.max_length": 1024, "training.max_steps": 2, "training.micro_batch_size": 2,
                                   "generation.max_new_tokens": 4, "evaluation.benchmarks": bench})
    s = run_pipeline(cfg, name="rel")
    assert [k for k, v in s.stages.items() if v["status"] == "ran"] == ["train_stage1",
                                                                        "evaluate_stage1_vpairs_cot_rail"]
    m = s.stages["evaluate_stage1_vpairs_cot_rail"]["outputs"]["metrics"]["overall"]
    assert m["n"] == 2 and m["failed"] == 0 and m["swap_failed"] == 0
    summary = json.loads(next((tmp_path / "pipe").rglob("data_summary.json")).read_text())
    assert summary["task"] == "relative" and summary["scores"] == [1, 0] and summary["encode_encoded"] == 4
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(s.parent_run_id)
    for key in ("accuracy", "position_agreement"):
        assert parent.data.metrics[f"stage1.vpairs.cot_rail.{key}"] == pytest.approx(m[key])
    with pytest.raises(ConfigError, match="relative"):
        run_pipeline(_cfg(tmp_path, train, **{"data.task": "relative", "data.train_format": "pairs-jsonl",
                                              "pipeline.method": "tract"}), name="rel-tract")
