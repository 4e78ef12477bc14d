"""Generation through a 2-replica Ray Data actor pool: tiny model (vs in-process) and the real SmolLM2-135M."""

from __future__ import annotations

import pytest
from gen_helpers import gen_config

from tract_dist.generate import pipeline
from tract_dist.generate.shards import read_generated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_ray_pool_matches_in_process(ray_local, tiny_export, quickstart_data, tmp_path):
    ray_cfg = gen_config(tiny_export, quickstart_data, tmp_path, "generation.ray=true", "generation.num_replicas=2",
                         "cluster.cpus_per_worker=0.5")
    summary = pipeline.generate_cots(ray_cfg, tiny_export, tmp_path / "ray", show_progress=False)
    assert summary["ok"] == 10 and summary["missing"] == summary["duplicates"] == 0
    local_cfg = gen_config(tiny_export, quickstart_data, tmp_path)
    pipeline.generate_cots(local_cfg, tiny_export, tmp_path / "local", show_progress=False)
    by_ray = {r["uid"]: r["cot"] for r in read_generated(tmp_path / "ray")}
    by_local = {r["uid"]: r["cot"] for r in read_generated(tmp_path / "local")}
    assert by_ray == by_local  # same seeds per example, whichever replica and batch an example lands in


def test_real_smollm2_through_two_replicas(ray_local, quickstart_data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which then wins over later configs in this process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    cfg = gen_config("smollm2", quickstart_data, tmp_path, "generation.ray=true", "generation.num_replicas=2",
                     "cluster.cpus_per_worker=0.5", "data.max_examples=3", "generation.num_cots=1",
                     "generation.batch_size=2", "generation.max_new_tokens=8", "data.max_length=470",
                     "generation.temperature=0")
    summary = pipeline.generate_cots(cfg, None, tmp_path / "out", show_progress=False)
    recs = read_generated(tmp_path / "out")
    assert sorted(r["uid"] for r in recs) == ["0#cot0", "1#cot0", "2#cot0"]
    assert summary["ok"] + summary["failed"] == 3 and summary["missing"] == 0
    for r in recs:
        assert r["prompt_tokens"] <= 470 - 8 and r["truncated"]
        assert r["status"] == "ok" or r["reason"] == "empty_cot", r
        assert r["new_tokens"] >= 1 and "So the overall" not in r["cot"]
    assert any(len(r["cot"].split()) >= 2 for r in recs)  # a real model writes words
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("tract-dist").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["prompts_per_s"] > 0 and run.data.metrics["tokens_per_s"] > 0
    assert run.data.metrics["ok"] == summary["ok"]
