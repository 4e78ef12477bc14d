import pytest

from tract_dist.tracking import log_artifact, log_metrics, log_params, start_run

pytestmark = [pytest.mark.usefixtures("migrated_mlflow_db")]


def test_parent_child_status_and_logging(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    with start_run(uri, "exp", "parent") as parent:
        with start_run(uri, "exp", "child", parent=parent) as child:
            log_metrics(child, {"loss": 1.5}, step=3)
            log_params(child, {f"p{i}": i for i in range(150)})
            (tmp_path / "a.txt").write_text("x")
            log_artifact(child, tmp_path / "a.txt")
        with pytest.raises(RuntimeError):
            with start_run(uri, "exp", "bad", parent=parent) as bad:
                raise RuntimeError("boom")
    c = MlflowClient(parent.tracking_uri)
    run = c.get_run(child.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics["loss"] == 1.5 and len(run.data.params) == 150
    assert [a.path for a in c.list_artifacts(child.run_id)] == ["a.txt"]
    assert str(tmp_path) in run.info.artifact_uri
    assert c.get_run(bad.run_id).info.status == "FAILED"
    assert c.get_run(parent.run_id).info.status == "FINISHED"


def test_disabled_is_a_no_op(tmp_path):
    with start_run(f"sqlite:///{tmp_path}/unused.db", "exp", enabled=False) as h:
        assert not h.enabled
        log_metrics(h, {"a": 1.0})
    assert not (tmp_path / "unused.db").exists()  # no store was opened


def test_one_process_can_use_two_stores(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run(f"sqlite:///{tmp_path}/a.db", "exp") as a:
        pass
    with start_run(f"sqlite:///{tmp_path}/b.db", "exp") as b:
        pass
    assert a.tracking_uri.endswith("a.db") and b.tracking_uri.endswith("b.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # each run lives in its own store and only there (two runs in one store would fail here)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for mine, other in ((a, b), (b, a)):
        client = MlflowClient(mine.tracking_uri)
        assert client.get_run(mine.run_id).info.run_id == mine.run_id
        with pytest.raises(MlflowException):
            client.get_run(other.run_id)
