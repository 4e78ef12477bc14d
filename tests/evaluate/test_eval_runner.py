"""evaluate_model end to end on a tiny judge: in-process, through the Ray actor pool, and the CLI."""

from __future__ import annotations

import json

import pytest

from tract_dist.config import load_config
from tract_dist.evaluate.runner import EvaluateSpec, evaluate_model, load_predictions

pytestmark = [pytest.mark.usefixtures("migrated_mlflow_db")]


def _cfg(model, data_path, tmp_path, *extra):
    return load_config(None, [
        f"model.name_or_path={model}", "data.max_length=4096",
        f"evaluation.benchmarks=[{{name: vicuna, path: '{data_path}', format: jsonl, max_examples: 6}}]",
        "evaluation.mode=cot_rail", "evaluation.num_cots=1", "evaluation.batch_size=3", "evaluation.ray=false",
        "generation.max_new_tokens=4", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *extra,
    ])


def test_evaluate_in_process_logs_everything(tiny_export, quickstart_data, quickstart_examples, vicuna_path, tmp_path,
                                             monkeypatch):
    """An absolute benchmark and a relative one (#29: Vicuna paired by gold-score difference) in one run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri exports it process-wide
    both = (f"evaluation.benchmarks=[{{name: vicuna, path: '{quickstart_data}', format: jsonl, max_examples: 6}}, "
            f"{{name: pairs, path: '{vicuna_path}', format: vicuna-pairs, max_examples: 2}}]")
    res = evaluate_model(EvaluateSpec.of(_cfg(tiny_export, quickstart_data, tmp_path, both)), None, tmp_path / "eval",
                         show_progress=False)
    preds = load_predictions(tmp_path / "eval" / "vicuna" / "predictions.jsonl")
    assert [p["id"] for p in preds] == [e.id for e in quickstart_examples[:6]]
    assert [p["gold"] for p in preds] == [e.score for e in quickstart_examples[:6]]
    assert all(p["prediction"] is not None and len(p["detail"]["cots"]) == 1 for p in preds)
    o = res["vicuna"]["overall"]
    assert o["total"] == 6 and o["failed"] == 0
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tract-dist").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["vicuna.rmse"] == pytest.approx(o["rmse"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate/vicuna")}
    assert arts == {"evaluate/vicuna/predictions.jsonl", "evaluate/vicuna/metrics.json", "evaluate/vicuna/scatter.png"}
    from tract_dist.data.pair_formats import read_vicuna_pairs
    from tract_dist.evaluate.pairwise import evaluate_pair_predictions

    pairs = read_vicuna_pairs(vicuna_path)[:2]
    got = load_predictions(tmp_path / "eval" / "pairs" / "predictions.jsonl")
    assert [p["id"] for p in got] == [x.id for x in pairs] and [p["gold"] for p in got] == [1.0, 0.0]
    assert all(0 < p["prediction"] < 1 and 0 < p["swapped"] < 1 and len(p["detail"]["swapped"]["cots"]) == 1
               for p in got)
    pm = res["pairs"]["overall"]
    assert pm == evaluate_pair_predictions(got)["overall"] and pm["n"] == 2
    for key in ("accuracy", "position_agreement", "accuracy_debiased", "position_bias"):
        assert run.data.metrics[f"pairs.{key}"] == pytest.approx(pm[key])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_evaluate_on_ray_pool_matches_in_process(ray_local, tiny_export, quickstart_data, tmp_path):
    local = evaluate_model(EvaluateSpec.of(_cfg(tiny_export, quickstart_data, tmp_path, "evaluation.mode=rail",
                                                "tracking.enabled=false")),
                           None, tmp_path / "local", show_progress=False)
    on_ray = evaluate_model(EvaluateSpec.of(_cfg(tiny_export, quickstart_data, tmp_path, "evaluation.mode=rail",
                                                 "evaluation.ray=true", "generation.num_replicas=2",
                                                 "cluster.cpus_per_worker=0.5", "tracking.enabled=false")),
                            None, tmp_path / "ray", show_progress=False)
    a = load_predictions(tmp_path / "local" / "vicuna" / "predictions.jsonl")
    b = load_predictions(tmp_path / "ray" / "vicuna" / "predictions.jsonl")
    assert [p["id"] for p in a] == [p["id"] for p in b]
    assert [p["prediction"] for p in b] == pytest.approx([p["prediction"] for p in a], rel=1e-5)
    assert on_ray["vicuna"]["overall"]["n"] == local["vicuna"]["overall"]["n"] == 6


def test_evaluate_cli(tiny_export, quickstart_data, tmp_path, capsys):
    from tract_dist.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model:\n  name_or_path: /nonexistent\nevaluation:\n  ray: false\n  mode: rail\n"
                   f"  benchmarks:\n    - name: vic\n      path: {quickstart_data}\n      format: jsonl\n      max_examples: 4\n"
                   "tracking:\n  enabled: false\n")
    assert main(["evaluate", str(cfg), "--model", tiny_export, "--output-dir", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vic"]["total"] == 4
    assert (tmp_path / "o" / "vic" / "scatter.png").exists()
    assert main(["evaluate", str(cfg), "evaluation.benchmarks=[]"]) == 2
