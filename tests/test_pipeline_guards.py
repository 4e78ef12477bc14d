"""The pipeline's guards, checked before (or instead of) any stage: one invocation at a time, a corrupt
state.json named, a parent MLflow run that no longer exists replaced, stage folders named by fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tract_dist.cli import main
from tract_dist.config import load_config

pytestmark = [pytest.mark.timeout(120)]


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

    from tract_dist.pipeline import _hash, file_fingerprint, run_pipeline, stage_config
    from tract_dist.train.trainer import fingerprint

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
