"""An export folder as an MLflow 3 logged model (transformers flavour, or an external pointer when too large),
linked to its run, registered under a name, and never copied twice; read back as the UI reads it
(``search_logged_models``, run outputs and inputs, model metrics) through a plain MlflowClient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("migrated_mlflow_db")


@pytest.mark.timeout(300)
def test_export_logged_linked_registered_and_never_copied_twice(tiny_export, tmp_path, monkeypatch):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from tract_dist.identity import content_fingerprint
    from tract_dist.tracking.mlflow_run import log_metrics, start_run
    from tract_dist.tracking.models import link_model_input, log_model_folder

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    other = Path(shutil.copytree(tiny_export, tmp_path / "other"))  # other weights (one config key more)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "tract_note": "another model"}))
    odd = Path(shutil.copytree(tiny_export, tmp_path / "odd"))  # a config naming no class: the flavour refuses it
    (odd / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    with start_run(uri, "exp", "stage1-train") as train:
        full = log_model_folder(train, tiny_export, name="stage1-pipeline-x", step=4, registered_model_name="judge")
        again = log_model_folder(train, tiny_export, registered_model_name="judge")  # a rerun: the same weights
        pointer = log_model_folder(train, other, name="big", max_copy_bytes=1 << 20)  # 16 MB: over this limit
        fallback = log_model_folder(train, odd, name="odd")
    assert full is not None and (full.kind, full.name, full.version) == ("transformers", "stage1-pipeline-x", "1")
    assert again is not None and (again.kind, again.model_id, again.version) == ("existing", full.model_id, "1")
    assert pointer is not None and pointer.kind == "external"
    assert fallback is not None and fallback.kind == "external"  # still a model the run leads to

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("exp")
    models = {m.name: m for m in c.search_logged_models([exp.experiment_id])}  # the experiment's Models tab
    assert set(models) == {"stage1-pipeline-x", "big", "odd"}  # one model per distinct export, none twice
    m = models["stage1-pipeline-x"]
    assert m.source_run_id == train.run_id and str(m.status).endswith("READY") and m.model_type == "tract-judge"
    assert m.tags["tract.content_fingerprint"] == content_fingerprint(tiny_export)
    assert m.params["config.architectures"] == "LlamaForCausalLM"
    outputs = c.get_run(train.run_id).outputs.model_outputs  # the run page's "Logged models"
    assert {(o.model_id, o.step) for o in outputs} >= {(full.model_id, 4), (pointer.model_id, 0)}
    version = c.get_model_version("judge", "1")
    assert (version.source, version.run_id, version.tags["tract.model_id"]) == (m.artifact_location, train.run_id,
                                                                                full.model_id)
    assert len(c.search_model_versions("name='judge'")) == 1

    # The transformers-flavour model holds the export's files, byte for byte, as hard links on a local store.
    # (models:/ URIs resolve through the process-wide tracking URI, as a user's MLFLOW_TRACKING_URI.)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = Path(mlflow.artifacts.download_artifacts(full.model_uri, dst_path=str(tmp_path / "dl")))
    assert "transformers" in (got / "MLmodel").read_text()
    src = Path(tiny_export)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (got / "model" / name).read_bytes() == (src / name).read_bytes()
    stored = Path(m.artifact_location.replace("file://", "")) / "model" / "model.safetensors"
    assert stored.stat().st_ino == (src / "model.safetensors").stat().st_ino  # no second copy on disk

    # The external (pointer) model: MLflow 3's external marker, the small files and where the weights are.
    p = models["big"]
    assert p.tags["mlflow.model.isExternal"] == "true" and p.tags["tract.kind"] == "external"
    ptr = Path(mlflow.artifacts.download_artifacts(pointer.model_uri, dst_path=str(tmp_path / "p")))
    meta = json.loads((ptr / "tract_pointer.json").read_text())
    assert meta["path"] == str(other.resolve()) and meta["content_fingerprint"] == content_fingerprint(other)
    assert meta["size_bytes"] == sum(f.stat().st_size for f in other.rglob("*") if f.is_file())
    assert (ptr / "config.json").read_bytes() == (other / "config.json").read_bytes()
    assert not (ptr / "model.safetensors").exists()  # weights stay where they are
    why = json.loads((Path(mlflow.artifacts.download_artifacts(fallback.model_uri, dst_path=str(tmp_path / "o")))
                      / "tract_pointer.json").read_text())["why"]
    assert "transformers flavour could not save it" in why

    # An evaluation of the export: the model is its input, and its metrics are the model's (Models tab).
    with start_run(uri, "exp", "eval-stage1-vicuna") as ev:
        model_id = link_model_input(ev, tiny_export)
        log_metrics(ev, {"vicuna.pearson": 0.5}, model_id=model_id, dataset=("vicuna", "abc123"))
    assert model_id == full.model_id
    assert [i.model_id for i in c.get_run(ev.run_id).inputs.model_inputs] == [full.model_id]
    metrics = c.get_logged_model(full.model_id).metrics
    assert [(x.key, x.value, x.dataset_name, x.run_id) for x in metrics] == [("vicuna.pearson", 0.5, "vicuna",
                                                                              ev.run_id)]


def test_disabled_tracking_and_a_non_model_folder(tmp_path, monkeypatch):
    from tract_dist.tracking.mlflow_run import STATS, RunHandle, start_run
    from tract_dist.tracking.models import log_model_folder

    assert log_model_folder(RunHandle("file:///nowhere", None), tmp_path) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = STATS.failed_calls
    with start_run(f"sqlite:///{tmp_path}/mlflow.db", "e", "r") as handle:
        assert log_model_folder(handle, tmp_path / "empty") is None  # a warning, never an exception
    assert STATS.failed_calls == before + 1


def test_model_names_are_ones_mlflow_accepts():
    from tract_dist.tracking.models import model_name

    assert model_name("stage1", "pipeline-tract-abc") == "stage1-pipeline-tract-abc"
    assert model_name("served", "runs/x.y:z") == "served-runs_x_y_z"
    assert model_name(None, "") == "model"
