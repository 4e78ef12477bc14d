"""An export folder logged as an MLflow model (transformers flavour, or a pointer when too large), registered
under a name, read back through a plain MlflowClient against a local file store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_export_logged_and_registered(tiny_export, tmp_path, monkeypatch):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from tract_dist.fsutil import content_fingerprint
    from tract_dist.tracking.mlflow_run import start_run
    from tract_dist.tracking.models import log_model_folder

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with start_run(uri, "serve-test", "serve") as handle:
        full = log_model_folder(handle, tiny_export, registered_model_name="tract-judge")
        pointer = log_model_folder(handle, tiny_export, artifact_path="pointer", registered_model_name="tract-judge",
                                   max_copy_bytes=1 << 20)  # the tiny export is 16 MB: over this limit
    assert full is not None and full.kind == "transformers" and full.version == "1"
    assert pointer is not None and pointer.kind == "pointer" and pointer.version == "2"
    client = MlflowClient(uri)
    versions = {str(v.version): v for v in client.search_model_versions("name='tract-judge'")}
    assert versions["1"].source == f"runs:/{handle.run_id}/model" and versions["1"].run_id == handle.run_id
    assert versions["2"].source == f"runs:/{handle.run_id}/pointer"

    got = Path(mlflow.artifacts.download_artifacts(full.model_uri, tracking_uri=uri, dst_path=str(tmp_path / "dl")))
    assert "transformers" in (got / "MLmodel").read_text()
    src = Path(tiny_export)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # the folder's files, byte for byte
        assert (got / "model" / name).read_bytes() == (src / name).read_bytes()

    ptr = Path(mlflow.artifacts.download_artifacts(pointer.model_uri, tracking_uri=uri, dst_path=str(tmp_path / "p")))
    meta = json.loads((ptr / "tract_pointer.json").read_text())
    assert meta["path"] == str(src.resolve()) and meta["content_fingerprint"] == content_fingerprint(src)
    assert meta["size_bytes"] == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert (ptr / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not (ptr / "model.safetensors").exists()  # weights stay where they are


def test_disabled_tracking_and_a_non_model_folder(tmp_path, monkeypatch):
    from tract_dist.tracking.mlflow_run import STATS, RunHandle, start_run
    from tract_dist.tracking.models import log_model_folder

    assert log_model_folder(RunHandle("file:///nowhere", None), tmp_path) is None
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    before = STATS.failed_calls
    with start_run((tmp_path / "mlruns").as_uri(), "e", "r") as handle:
        assert log_model_folder(handle, tmp_path / "empty") is None  # a warning, never an exception
    assert STATS.failed_calls == before + 1
