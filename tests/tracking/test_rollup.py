"""The pipeline's run as users compare it in MLflow, without a pipeline: the experiment kind the UI opens on,
dataset inputs with digests, and the roll-up of child runs' headline results onto the parent, all read back
through a plain MlflowClient on a local SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tract_dist.tracking import log_artifact, log_metrics, log_params, set_tags, start_run

pytestmark = [pytest.mark.usefixtures("migrated_mlflow_db")]


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/m.db"


def test_experiment_is_a_model_training_one(uri):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    old = c.create_experiment("older")  # made before this rule: no kind
    chosen = c.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("new", "older", "genai"):
        with start_run(uri, name, "r"):
            pass
    kind = {n: c.get_experiment_by_name(n).tags.get("mlflow.experimentKind") for n in ("new", "older", "genai")}
    assert kind == {"new": "custom_model_development", "older": "custom_model_development",
                    "genai": "genai_development"}  # a kind someone chose is kept
    assert c.get_experiment(old).experiment_id == old


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dataset_inputs_name_source_digest_and_count(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from tract_dist.data.schema import JudgeExample
    from tract_dist.tracking.datasets import EVALUATION, TRAINING, examples_dataset, file_dataset, log_datasets

    a = _write(tmp_path / "train.jsonl", [{"x": 1}, {"x": 2}, {"x": 3}])
    same = _write(tmp_path / "copy.jsonl", [{"x": 1}, {"x": 2}, {"x": 3}])
    other = _write(tmp_path / "other.jsonl", [{"x": 1}, {"x": 2}, {"x": 4}])
    d = file_dataset("train", str(a), 3, TRAINING, profile={"invalid": 0})
    assert file_dataset("train", str(same), 3, TRAINING).digest == d.digest  # content, not the file name
    assert file_dataset("train", str(other), 3, TRAINING).digest != d.digest
    assert file_dataset("train", str(a), 2, TRAINING).digest != d.digest  # MLflow reuses a (name, digest)'s count

    def ex(i: str, score: float) -> JudgeExample:
        return JudgeExample(id=i, instruction="q", response="r", criteria="c", score_descriptions=["1", "5"],
                            score=score)

    bench = examples_dataset("vicuna", "hf:prometheus-eval/Vicuna_Bench", [ex("a", 1), ex("b", 5)], EVALUATION)
    assert examples_dataset("vicuna", "elsewhere", [ex("a", 1), ex("b", 5)], EVALUATION).digest == bench.digest
    assert examples_dataset("vicuna", "x", [ex("a", 1), ex("b", 4)], EVALUATION).digest != bench.digest

    with start_run(uri, "exp", "r") as run:
        log_datasets(run, [d, bench])
        log_datasets(run, [d])  # a second invocation of the same run: still one input
    inputs = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
    got = {i.dataset.name: i for i in inputs}
    assert len(inputs) == 2 and set(got) == {"train", "vicuna"}
    t = got["train"]
    assert t.dataset.digest == d.digest and json.loads(t.dataset.profile) == {"num_rows": 3, "invalid": 0}
    assert t.dataset.source_type == "local" and json.loads(t.dataset.source)["uri"] == a.resolve().as_uri()
    assert {x.key: x.value for x in t.tags}["mlflow.data.context"] == "training"
    v = got["vicuna"]
    assert v.dataset.source_type == "hugging_face" and json.loads(v.dataset.source)["path"] == \
        "prometheus-eval/Vicuna_Bench"
    assert json.loads(v.dataset.profile)["num_rows"] == 2
    assert {x.key: x.value for x in v.tags}["mlflow.data.context"] == "evaluation"


def _png(path: Path) -> Path:
    from tract_dist.evaluate.plots import scatter_plot

    return scatter_plot([{"prediction": 2.0, "gold": 3.0}, {"prediction": 4.0, "gold": 5.0}], path, "t")


def _eval_child(uri, parent, stage, bench, mode, metrics, tmp_path, rail="True", fail=False):
    tags = {"model_stage": stage, "benchmark": bench, "inference": mode, "stage": "evaluate"}
    try:
        with start_run(uri, "exp", f"eval-{stage}-{bench}", parent=parent, tags=tags) as run:
            log_params(run, {"rail_normalize": rail})
            log_metrics(run, {f"{bench}.{k}": v for k, v in metrics.items()})
            log_metrics(run, {f"{bench}.catA.pearson": -1.0})  # per category: not a headline metric
            log_artifact(run, _png(tmp_path / run.run_id / "scatter.png"), f"evaluate/{bench}")
            if fail:
                raise RuntimeError("crashed")
    except RuntimeError:
        pass
    return run


def test_roll_up_puts_the_childrens_headline_on_the_parent(uri, tmp_path, capsys):
    import time

    from mlflow.tracking import MlflowClient

    from tract_dist.tracking.datasets import TRAINING, file_dataset, log_datasets
    from tract_dist.tracking.rollup import HEADLINE, roll_up

    data = _write(tmp_path / "d.jsonl", [{"x": 1}])
    s2 = _write(tmp_path / "stage2.jsonl", [{"x": 2}])
    with start_run(uri, "exp", "pipe", tags={"stage": "pipeline", "method": "tract"}) as parent:
        for stage, path, steps in (("stage1", data, 4), ("stage2", s2, 3)):
            with start_run(uri, "exp", stage, parent=parent, tags={"stage": "train"}) as tr:
                set_tags(tr, {"model_stage": stage})
                log_params(tr, {"train_steps": steps, "train_examples": 1})
                log_datasets(tr, [file_dataset(path.stem, str(path), 1, TRAINING)])
        _eval_child(uri, parent, "stage2", "vicuna", "cot_rail", {"pearson": 0.1, "n": 6, "failed": 0}, tmp_path)
        time.sleep(0.01)
        _eval_child(uri, parent, "stage2", "vicuna", "cot_rail", {"pearson": 0.9}, tmp_path, fail=True)
        good = {"stage1": _eval_child(uri, parent, "stage1", "vicuna", "cot_rail",
                                      {"pearson": 0.3, "spearman": 0.2, "kendall": 0.1, "rmse": 1.2, "n": 5,
                                       "failed": 1}, tmp_path),
                "stage2": _eval_child(uri, parent, "stage2", "vicuna", "cot_rail",
                                      {"pearson": 0.5, "spearman": 0.4, "kendall": 0.3, "rmse": 0.9, "n": 6,
                                       "failed": 0}, tmp_path)}
        with start_run(uri, "exp", "unrelated", tags={"stage": "evaluate", "model_stage": "stage1",
                                                      "benchmark": "vicuna", "inference": "cot_rail"}) as other:
            log_metrics(other, {"vicuna.pearson": -0.5})  # not a child of this pipeline
        res = roll_up(parent, {"method": "tract", "model": "tiny", "lam": 1.0, "ce_on_score_token": False})
    c = MlflowClient(uri)
    run = c.get_run(parent.run_id)
    # Every headline metric equals the latest finished child's value of it (the crashed rerun and the
    # unrelated run are ignored; per-category values are not headline). An absolute benchmark logs no pairwise
    # metric (accuracy, position agreement), so none appears on the parent.
    absolute = ("pearson", "spearman", "kendall", "rmse", "n", "failed")
    assert set(absolute) < set(HEADLINE)
    expected = {}
    for stage, child in good.items():
        cm = c.get_run(child.run_id).data.metrics
        expected.update({f"{stage}.vicuna.cot_rail.{m}": cm[f"vicuna.{m}"] for m in absolute})
    assert {k: v for k, v in run.data.metrics.items()} == expected == res.metrics
    p = run.data.params
    assert (p["method"], p["model"], p["lam"], p["ce_on_score_token"], p["rail_normalize"]) == \
        ("tract", "tiny", "1.0", "False", "True")
    assert (p["stage1.train_steps"], p["stage2.train_steps"], p["stage2.train_examples"]) == ("4", "3", "1")
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"d", "stage2"}
    charts = {a.path for a in c.list_artifacts(parent.run_id, "charts")}
    assert charts == {"charts/pearson_by_benchmark.png", "charts/scatter-stage1-vicuna-cot_rail.png",
                      "charts/scatter-stage2-vicuna-cot_rail.png"} == set(res.charts)
    got = Path(c.download_artifacts(parent.run_id, "charts/pearson_by_benchmark.png", str(tmp_path / "dl")))
    assert got.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The runs view the pipeline links to (#23): the headline Pearson columns shown, not among 188 others.
    exp_tags = c.get_experiment(run.info.experiment_id).tags
    view = json.loads(exp_tags["mlflow.sharedViewState.tract-dist"])
    assert view["selectedColumns"] == ["attributes.`Source`", "attributes.`User`", "attributes.`Models`",
                                       "attributes.`Dataset`", "metrics.`stage1.vicuna.cot_rail.pearson`",
                                       "metrics.`stage2.vicuna.cot_rail.pearson`", "metrics.`vicuna.pearson`",
                                       "metrics.`loss`", "params.`method`", "params.`model`"]
    c.set_experiment_tag(run.info.experiment_id, "mlflow.sharedViewState.tract-dist",
                         json.dumps({"selectedColumns": ["metrics.`other.pearson`"]}))  # an earlier pipeline's

    # A rerun with another value for a param keeps MLflow's (immutable) one and says so.
    capsys.readouterr()
    with start_run(uri, "exp", run_id=parent.run_id) as again:
        roll_up(again, {"method": "tract", "lam": 0.5}, charts=False)
    assert c.get_run(parent.run_id).data.params["lam"] == "1.0"
    assert "param lam stays '1.0'" in capsys.readouterr().err
    kept = json.loads(c.get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.tract-dist"])
    assert "metrics.`other.pearson`" in kept["selectedColumns"]  # earlier pipelines' columns stay
