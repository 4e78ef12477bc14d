"""Generation through a 2-replica Ray Data actor pool (tiny model) against the same generation in-process."""

from __future__ import annotations

import pytest
from gen_helpers import gen_config

from tract_dist.generate import pipeline
from tract_dist.generate.shards import read_generated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.usefixtures("migrated_mlflow_db")]


def test_ray_pool_matches_in_process(ray_local, tiny_export, quickstart_data, tmp_path, monkeypatch):
    """Two replicas give the in-process CoTs (per-example seeds), truncate prompts to leave room for the CoT,
    and log the run's throughput to MLflow. (Real SmolLM2 through two Ray Data replicas: test_vllm_generation.)"""
    from mlflow.tracking import MlflowClient

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which then wins over later configs in this process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ray_cfg = gen_config(tiny_export, quickstart_data, tmp_path, "generation.ray=true", "generation.num_replicas=2",
                         "cluster.cpus_per_worker=0.5", "data.max_length=470")
    summary = pipeline.generate_cots(pipeline.GenerateSpec.of(ray_cfg), tiny_export, tmp_path / "ray",
                                     show_progress=False)
    assert summary["ok"] + summary["failed"] == 10 and summary["missing"] == summary["duplicates"] == 0
    recs = read_generated(tmp_path / "ray")
    assert len(recs) == 10 and any(r["truncated"] for r in recs)
    for r in recs:
        assert r["prompt_tokens"] <= 470 - 6 and r["new_tokens"] >= 1
        assert r["status"] == "ok" or r["reason"] == "empty_cot", r
    local_cfg = gen_config(tiny_export, quickstart_data, tmp_path, "data.max_length=470")
    pipeline.generate_cots(pipeline.GenerateSpec.of(local_cfg), tiny_export, tmp_path / "local", show_progress=False)
    by_ray = {r["uid"]: r["cot"] for r in recs}
    by_local = {r["uid"]: r["cot"] for r in read_generated(tmp_path / "local")}
    assert by_ray == by_local  # same seeds per example, whichever replica and batch an example lands in
    # each CoT's read-out (#24) comes back through Arrow as plain numbers, the in-process one's
    local = {r["uid"]: r for r in read_generated(tmp_path / "local")}
    for r in recs:
        if r["status"] == "ok":
            assert isinstance(r["rail_probs"], list) and all(isinstance(p, float) for p in r["rail_probs"])
            assert r["rail_probs"] == pytest.approx(local[r["uid"]]["rail_probs"], rel=1e-5)
            assert r["yhat"] == pytest.approx(local[r["uid"]]["yhat"], rel=1e-5)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tract-dist").experiment_id],
                              order_by=["attributes.start_time ASC"])
    ray_run = runs[0]
    assert ray_run.info.status == "FINISHED" and ray_run.data.metrics["ok"] == summary["ok"]
    assert ray_run.data.metrics["prompts_per_s"] > 0 and ray_run.data.metrics["tokens_per_s"] > 0
