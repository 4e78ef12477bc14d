"""The URI hand-overs of issue #27 against a real S3 API (moto's server on 127.0.0.1, tests/s3_server.py): the
two-way sync of immutable files, MLflow artifacts under ``cluster.storage_path``, and a pipeline whose
generation shards (uploaded as committed, resumed from what the URI holds), stage-2 data and evaluation
outputs land on the URI. A second node and Ray Train on S3: tests/multinode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from s3_server import keys, moto_server_path, s3_server

from tract_dist import storage

BUCKET = "tract-ci"
pytestmark = pytest.mark.skipif(moto_server_path() is None, reason="moto[server] is not installed "
                                                                   "(requirements/ci.txt)")


@pytest.fixture(scope="module")
def s3_env():
    with s3_server(BUCKET) as env:
        yield env


@pytest.fixture
def s3(s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    return s3_env


def test_sync_fetches_and_uploads_what_one_side_lacks(s3, tmp_path):
    remote = f"s3://{BUCKET}/sync/gen"
    a = tmp_path / "node-a"
    a.mkdir()
    (a / "part-00000.jsonl").write_text('{"uid": "x"}\n')
    (a / "settings.json").write_text("{}")
    (a / "logs").mkdir()
    (a / "logs" / "driver.log").write_text("chatter")
    pick = lambda n: not n.startswith("logs/")  # noqa: E731
    assert storage.sync_missing(a, remote, pick) == (0, 2)
    assert keys(s3, BUCKET, "sync/") == ["sync/gen/part-00000.jsonl", "sync/gen/settings.json"]
    b = tmp_path / "node-b"  # another node's empty folder: it gets the committed files, byte for byte
    assert storage.sync_missing(b, remote, pick) == (2, 0)
    assert (b / "part-00000.jsonl").read_bytes() == (a / "part-00000.jsonl").read_bytes()
    (b / "part-00001.jsonl").write_text('{"uid": "y"}\n')
    assert storage.sync_missing(b, remote, pick) == (0, 1) and storage.sync_missing(a, remote, pick) == (1, 0)
    assert not list(a.glob(".*.tmp"))
    (a / "part-00002.jsonl").write_text("1\n")
    (b / "part-00002.jsonl").write_text("22\n")
    storage.sync_missing(a, remote, pick)
    with pytest.raises(storage.StorageError, match="part-00002.jsonl has 2 bytes but .* has 3"):
        storage.sync_missing(b, remote, pick)
    # A replacing upload (outputs a rerun rewrites) and its filter.
    assert storage.push_dir(a, f"s3://{BUCKET}/push", pick) == 4
    assert "push/logs/driver.log" not in keys(s3, BUCKET, "push/")
    assert storage.mirror_of("/local/root", "x") is None and storage.mirror_of("s3://b/p", "x", "y") == "s3://b/p/x/y"


def test_mlflow_artifacts_under_a_uri_storage_path(s3, migrated_mlflow_db, tmp_path):
    """With cluster.storage_path on a URI a new experiment keeps its artifacts at <storage_path>/mlflow/<name>
    (MLflow's S3 store through boto3, the endpoint from AWS_ENDPOINT_URL)."""
    from tract_dist.config import load_config
    from tract_dist.tracking import log_artifact, start_run
    from tract_dist.tracking.mlflow_run import STATS, artifact_root

    cfg = load_config(None, ["model.name_or_path=tiny-llama", f"cluster.storage_path=s3://{BUCKET}/store",
                             "tracking.experiment=on-s3", f"tracking.tracking_uri={migrated_mlflow_db}"])
    assert artifact_root(cfg.cluster, cfg.tracking) == f"s3://{BUCKET}/store/mlflow/on-s3"
    # A local storage path: the store's own default location.
    local = load_config(None, ["model.name_or_path=tiny-llama"])
    assert artifact_root(local.cluster, local.tracking) is None
    f = tmp_path / "results.json"
    f.write_text('{"pearson": 0.5}')
    failed = STATS.failed_calls
    with start_run(migrated_mlflow_db, "on-s3", "r", artifact_root=artifact_root(cfg.cluster, cfg.tracking)) as run:
        log_artifact(run, f, "pipeline")
    assert STATS.failed_calls == failed
    got = [k for k in keys(s3, BUCKET, "store/mlflow/on-s3/") if k.endswith("pipeline/results.json")]
    assert len(got) == 1 and run.run_id in got[0]


@pytest.mark.timeout(300)
def test_pipeline_hands_over_through_the_uri(s3, tiny_export, quickstart_data, migrated_mlflow_db, tmp_path):
    """A pipeline with cluster.storage_path on S3 from a given stage-1 export (no training: CI's budget):
    generation's shards, stage2.jsonl and the evaluation's outputs land under <storage_path>/<pipeline>/, the
    experiment's artifacts under <storage_path>/mlflow/<experiment>/; a driver that lost its generation folder
    resumes from the URI."""
    from tract_dist.config import load_config
    from tract_dist.generate.shards import read_generated
    from tract_dist.pipeline import run_pipeline

    bench = {"name": "vicuna", "path": str(quickstart_data), "format": "jsonl", "max_examples": 2}
    over = {"model.name_or_path": tiny_export, "data.train_path": str(quickstart_data),
            "data.train_format": "jsonl", "data.max_examples": 2, "data.max_length": 640,
            "pipeline.method": "tract", "pipeline.output_dir": str(tmp_path / "pipe"),
            "pipeline.stage1_export": tiny_export, "pipeline.evaluate_stage1": True,
            "pipeline.stages": ["stage1_export", "generate", "build_stage2", "evaluate_stage1_*"],
            "generation.ray": False, "generation.max_new_tokens": 2, "generation.num_cots": 1,
            "evaluation.ray": False, "evaluation.benchmarks": [bench], "evaluation.num_cots": 1,
            "cluster.launcher": "inline", "cluster.storage_path": f"s3://{BUCKET}/pipes",
            "tracking.tracking_uri": migrated_mlflow_db, "tracking.experiment": "pipes"}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    s = run_pipeline(cfg, name="p")
    assert [k for k, v in s.stages.items() if v["status"] == "ran"] == [
        "stage1_export", "generate", "build_stage2", "evaluate_stage1_vicuna_cot_rail"]
    pdir = tmp_path / "pipe" / "p"
    on_s3 = [k.removeprefix("pipes/p/") for k in keys(s3, BUCKET, "pipes/p/")]
    gen = Path(s.stages["generate"]["outputs"]["dir"]).name
    assert sorted(k for k in on_s3 if k.startswith(f"{gen}/part-")) == sorted(
        f"{gen}/{p.name}" for p in (pdir / gen).glob("part-*.jsonl"))
    assert "stage2.jsonl" in on_s3
    evals = sorted(k for k in on_s3 if k.startswith("evaluate/"))
    assert "evaluate/stage1-vicuna-cot_rail/vicuna/predictions.jsonl" in evals and not any("/logs/" in k for k in evals)
    assert any(k.endswith("pipeline/results.json") for k in keys(s3, BUCKET, "pipes/mlflow/pipes/"))

    # The driver's generation folder is lost (another node's driver, a lost disk): the rerun fetches the
    # shards from the URI and generates nothing again; the stages after it stay up to date.
    written = sorted(read_generated(pdir / gen), key=lambda r: r["uid"])
    shutil.rmtree(pdir / gen)
    again = run_pipeline(cfg, name="p")
    assert {k: v["status"] for k, v in again.stages.items()} == {
        "stage1_export": "skipped", "generate": "ran", "build_stage2": "skipped",
        "evaluate_stage1_vicuna_cot_rail": "skipped"}
    summary = json.loads((pdir / gen / "summary.json").read_text())
    assert summary["this_run"]["generated_this_run"] == 0 and summary["missing"] == 0
    assert sorted(read_generated(pdir / gen), key=lambda r: r["uid"]) == written
