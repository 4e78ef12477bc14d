"""The URI hand-overs of issue #27 against a real S3 API (moto's server on 127.0.0.1, tests/s3_server.py): the
mirror of a generation folder (shards uploaded as committed, resume from what the URI holds), an evaluation's
outputs, and MLflow artifacts under ``cluster.storage_path``. A second node and Ray Train on S3: tests/multinode."""

from __future__ import annotations

import json
import shutil

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


def test_generation_mirrors_shards_and_resumes_from_the_uri(s3, tiny_export, quickstart_data, tmp_path):
    """Shards reach the URI as they are committed; a driver with an empty folder (another node, a lost disk)
    resumes from the URI: it generates nothing again and ends with the same records."""
    from tract_dist.config import load_config
    from tract_dist.generate import pipeline
    from tract_dist.generate.shards import read_generated

    cfg = load_config(None, [  # tests/generate/gen_helpers.py's small in-process config, two prompts
        f"model.name_or_path={tiny_export}", f"data.train_path={quickstart_data}", "data.train_format=jsonl",
        "data.max_length=640", "data.max_examples=2", "generation.max_new_tokens=2", "generation.num_cots=1",
        "generation.batch_size=2", "generation.shard_size=1", "generation.ray=false",
        "tracking.enabled=false"])
    mirror = f"s3://{BUCKET}/pipe/generate-0"
    first = pipeline.generate_cots(cfg, tiny_export, tmp_path / "a", show_progress=False, mirror=mirror)
    assert first["ok"] + first["failed"] == 2 and first["this_run"]["generated_this_run"] == 2
    on_s3 = [k.removeprefix("pipe/generate-0/") for k in keys(s3, BUCKET, "pipe/generate-0/")]
    assert sorted(on_s3) == ["failures.jsonl", "part-00000.jsonl", "part-00001.jsonl", "settings.json",
                             "summary.json"]  # no logs, no temporary files
    by_uid = lambda recs: sorted(recs, key=lambda r: r["uid"])  # noqa: E731
    written = by_uid(read_generated(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["fingerprint"]

    shutil.rmtree(tmp_path / "a")
    again = pipeline.generate_cots(cfg, tiny_export, tmp_path / "b", show_progress=False, mirror=mirror)
    assert again["this_run"]["generated_this_run"] == 0 and again["missing"] == 0 and again["ok"] == first["ok"]
    assert by_uid(read_generated(tmp_path / "b")) == written


def test_mlflow_artifacts_under_a_uri_storage_path(s3, migrated_mlflow_db, tmp_path):
    """With cluster.storage_path on a URI a new experiment keeps its artifacts at <storage_path>/mlflow/<name>
    (MLflow's S3 store through boto3, the endpoint from AWS_ENDPOINT_URL)."""
    from tract_dist.config import load_config
    from tract_dist.tracking import log_artifact, start_run
    from tract_dist.tracking.mlflow_run import STATS, artifact_root

    cfg = load_config(None, ["model.name_or_path=tiny-llama", f"cluster.storage_path=s3://{BUCKET}/store",
                             "tracking.experiment=on-s3", f"tracking.tracking_uri={migrated_mlflow_db}"])
    assert artifact_root(cfg) == f"s3://{BUCKET}/store/mlflow/on-s3"
    # A local storage path: the store's own default location.
    assert artifact_root(load_config(None, ["model.name_or_path=tiny-llama"])) is None
    f = tmp_path / "results.json"
    f.write_text('{"pearson": 0.5}')
    failed = STATS.failed_calls
    with start_run(migrated_mlflow_db, "on-s3", "r", artifact_root=artifact_root(cfg)) as run:
        log_artifact(run, f, "pipeline")
    assert STATS.failed_calls == failed
    got = [k for k in keys(s3, BUCKET, "store/mlflow/on-s3/") if k.endswith("pipeline/results.json")]
    assert len(got) == 1 and run.run_id in got[0]
