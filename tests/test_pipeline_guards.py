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

    from tract_dist.fsutil import file_fingerprint
    from tract_dist.pipeline import _hash, run_pipeline, stage_config
    from tract_dist.pipeline_checks import fingerprint

    cfg = _cfg(tmp_path, quickstart_data)
    pdir = tmp_path / "pipe" / "p"
    pdir.mkdir(parents=True)
    s1_fp = _hash("train", fingerprint(stage_config(cfg, pdir)), file_fingerprint(cfg.data.train_path))
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


def _digest(*parts) -> str:
    """The stage-fingerprint digest every pipeline folder so far was made with (state.json, folder names)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def test_stage_list_keeps_the_fingerprints_of_existing_pipeline_folders(tmp_path, quickstart_data):
    """Stage names, order and fingerprints, recomputed here from what each stage hashes (settings, upstream
    fingerprint, data files): a pipeline folder made before the stage list still resumes."""
    from tract_dist.fsutil import file_fingerprint
    from tract_dist.pipeline import plan_pipeline, stage_config
    from tract_dist.pipeline_checks import fingerprint

    bench = {"name": "v", "path": str(quickstart_data), "format": "jsonl", "max_examples": 3}
    cfg = _cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "evaluation.benchmarks": [bench]})
    pdir = tmp_path / "pipe" / "p"
    data_fp = file_fingerprint(str(quickstart_data))
    s1 = _digest("train", fingerprint(stage_config(cfg, pdir)), data_fp)
    # keys added later (#24: selection, the adaptive CoT count; #26: the inference context) are absent from what
    # earlier folders hashed
    generation = {k: v for k, v in cfg.generation.model_dump().items()
                  if k not in ("select", "select_tolerance", "select_fallback", "max_length")}
    data = {k: v for k, v in cfg.data.model_dump().items() if k != "enable_thinking"}  # #28, off: as before
    gen = _digest("generate", s1, generation, data)
    s2d = _digest("stage2_data", gen)
    s2 = _digest("train", fingerprint(stage_config(cfg, pdir, train_path=str(pdir / "stage2.jsonl"),
                                                   train_format="jsonl")), s2d)
    b = cfg.evaluation.benchmarks[0]

    # the evaluation settings as folders made before evaluation.rail_normalize could be unset hashed them: false,
    # the training default the pipeline's exports record
    evaluation = {k: v for k, v in cfg.evaluation.model_dump().items()
                  if k not in ("cot_se_target", "max_cots", "sample_single_cot")}
    evaluation["rail_normalize"] = False

    def ev(model_fp):
        return _digest("evaluate", model_fp, b.model_dump(), "cot_rail", evaluation, generation, data_fp)

    plan = plan_pipeline(cfg, name="p")
    assert {k: v.fingerprint for k, v in plan.items()} == {
        "train_stage1": s1, "generate": gen, "build_stage2": s2d, "train_stage2": s2,
        "evaluate_stage1_v_cot_rail": ev(s1), "evaluate_stage2_v_cot_rail": ev(s2)}
    assert list(plan) == ["train_stage1", "generate", "build_stage2", "train_stage2",
                          "evaluate_stage1_v_cot_rail", "evaluate_stage2_v_cot_rail"]
    assert {v.status for v in plan.values()} == {"to run"}
    # a selection rule is the stage-2 data's business: the CoTs (and stage 1) keep their fingerprints
    sel = plan_pipeline(_cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "evaluation.benchmarks": [bench],
                                                           "generation.select": "nearest"}), name="p")
    assert [sel[k].fingerprint == plan[k].fingerprint for k in plan] == [True, True, False, False, True, False]
    # a λ warm-up is a training setting (and 0, its default, hashes as configs before it did)
    warm = plan_pipeline(_cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract", "evaluation.benchmarks": [bench],
                                                            "loss.lam_warmup_steps": 3}), name="p")
    assert warm["train_stage1"].fingerprint != s1
    # the template's thinking switch changes every prompt: all stages (its default hashes as before: above)
    think = plan_pipeline(_cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract",
                                                             "evaluation.benchmarks": [bench],
                                                             "data.enable_thinking": True}), name="p")
    assert all(think[k].fingerprint != plan[k].fingerprint for k in plan)

    def changed(**over):  # which stages a setting re-runs (#26's keys)
        other = plan_pipeline(_cfg(tmp_path, quickstart_data, **{"pipeline.method": "tract",
                                                                 "evaluation.benchmarks": [bench], **over}), name="p")
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
    from tract_dist.fsutil import content_fingerprint
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
    assert plan["stage1_export"].fingerprint == _digest("stage1_export", content_fingerprint(export))
    gen = plan["generate"].fingerprint
    (export / "model.safetensors").write_bytes(b"weights-2")  # another model at the same path: other CoTs
    assert plan_pipeline(cfg, name="p")["generate"].fingerprint != gen

    for bad, why in ((tmp_path / "nope", "is not a folder"), (tmp_path / "export", "holds no config.json")):
        cfg_file = _write(tmp_path, _cfg(tmp_path, quickstart_data, **{"pipeline.stage1_export": str(bad)}))
        assert main(["pipeline", str(cfg_file), "--name", "p"]) == 2
        err = capsys.readouterr().err
        assert f"pipeline.stage1_export: '{bad}' {why}" in err and "Traceback" not in err


def test_threads_per_replica_reaches_the_inference_pool(tmp_path, quickstart_data):
    from tract_dist.runtime.pool import PoolSpec

    for use_ray in (False, True):
        cfg = _cfg(tmp_path, quickstart_data, **{"cluster.threads_per_replica": 1})
        assert PoolSpec.from_config(cfg, use_ray=use_ray, batch_size=2).torch_threads() == 1
    import os

    shared = PoolSpec.from_config(_cfg(tmp_path, quickstart_data, **{"cluster.num_workers": 2}), use_ray=True,
                                  batch_size=2)
    assert shared.torch_threads() == max(1, (os.cpu_count() or 1) // 2)
