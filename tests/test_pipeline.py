"""The whole pipeline on a tiny model: four stages, MLflow parent/child runs, stage 2 from the seed weights,
skip on rerun, resume after an interruption; and the same against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tract_dist.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("migrated_mlflow_db")]


def _cfg(tmp: Path, data: Path, **over):
    base = {
        "model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
        "data": {"train_path": str(data), "train_format": "jsonl", "max_length": 768,
                 "max_examples": 8},
        "training": {"max_steps": 4, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "save_steps": 2,
                     "learning_rate": 1e-3, "seed": 3},
        "generation": {"max_new_tokens": 12, "batch_size": 4, "temperature": 1.0},
        "evaluation": {"benchmarks": [{"name": "vicuna", "path": str(data), "format": "jsonl",
                                       "max_examples": 6}], "batch_size": 6},
        "pipeline": {"method": "tract", "output_dir": str(tmp / "pipe")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "pipe"},
        "cluster": {"num_workers": 2},
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()], base=base)


@pytest.mark.timeout(900)
def test_tract_pipeline_end_to_end(tmp_path, quickstart_data, ray_local, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.loss import CoTRaftLossOptions
    from tract_dist.models import causal_lm_cot_raft_loss
    from tract_dist.pipeline import run_pipeline
    from tract_dist.train.data import StepPlan, collate, load_encoded, load_score_tokens
    from tract_dist.train.hooks import HookSpec, install_hooks, uninstall_hooks
    from tract_dist.train.model_init import load_training_model

    # Training and generation on Ray; the evaluations in-process (the Ray evaluation pool against in-process:
    # tests/evaluate/test_eval_runner.py), which spares two pool start-ups of suite time.
    cfg = _cfg(tmp_path, quickstart_data, **{"cluster.max_failures": 0, "evaluation.ray": False})
    # 1) interrupted: stage 1 dies after its step-2 checkpoint
    hook = HookSpec(f"{Path(__file__).parent / 'train' / 'train_fault_hooks.py'}:fail_once", {"after_step": 3})
    install_hooks(hook)
    try:
        with pytest.raises(Exception, match="injected failure"):
            run_pipeline(cfg, name="p")
    finally:
        uninstall_hooks()
    # 2) rerun: stage 1 resumes from its checkpoint, the rest runs
    s = run_pipeline(cfg, name="p")
    assert [k for k, v in s.stages.items() if v["status"] == "ran"] == [
        "train_stage1", "generate", "build_stage2", "train_stage2",
        "evaluate_stage1_vicuna_cot_rail", "evaluate_stage2_vicuna_cot_rail"]
    pdir = tmp_path / "pipe" / "p"
    s1_dir = Path(s.stages["train_stage1"]["outputs"]["run_dir"])
    assert json.loads((s1_dir / "train_result.json").read_text())["start_step"] == 2
    # 3) rerun: everything up to date
    s = run_pipeline(cfg, name="p")
    assert {v["status"] for v in s.stages.values()} == {"skipped"}

    # Stage 2 trained from the seed weights: its first logged loss is the seed model's loss on its first batch.
    s2_dir = Path(s.stages["train_stage2"]["outputs"]["run_dir"])
    first = json.loads((s2_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    data, st = load_encoded(s2_dir), load_score_tokens(s2_dir)
    t = cfg.training
    plan = StepPlan(len(data), t.micro_batch_size * t.gradient_accumulation_steps * 2, t.seed, t.epochs, t.max_steps)
    batch = collate([data[i] for i in plan.step_indices(0).tolist()], load_tokenizer("smollm2").pad_token_id)

    def loss_of(model):
        with torch.no_grad():
            options = CoTRaftLossOptions(st.token_ids, st.scores, impl="reference")
            return causal_lm_cot_raft_loss(model, batch, options).loss.item()

    from transformers import AutoModelForCausalLM

    seed = load_training_model(cfg, load_tokenizer("smollm2"), use_cuda=False)
    stage1 = AutoModelForCausalLM.from_pretrained(s.stages["train_stage1"]["outputs"]["model"])
    assert first == pytest.approx(loss_of(seed), rel=1e-5)
    assert abs(first - loss_of(stage1)) > 1e-3
    # The stage-2 data are the stage-1 model's CoTs with gold scores.
    rows = [json.loads(x) for x in (pdir / "stage2.jsonl").read_text().splitlines()]
    assert rows and all(r["feedback"] for r in rows)

    # MLflow: one parent, a child per stage and per benchmark evaluation.
    c = MlflowClient(s.stages and f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("pipe")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    kinds = sorted(r.data.tags.get("stage") for r in children)
    assert kinds == ["build_stage2", "evaluate", "evaluate", "generate", "train", "train"]
    evals = [r for r in children if r.data.tags.get("stage") == "evaluate"]
    assert all("vicuna.pearson" in r.data.metrics or "vicuna.rmse" in r.data.metrics for r in evals)

    from tract_dist.cli import main

    capsys.readouterr()
    assert main(["compare", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--experiment", "pipe"]) == 0
    table = capsys.readouterr().out
    assert "tract" in table and "stage2" in table and "vicuna:rmse" in table


@pytest.mark.timeout(600)
def test_pipeline_runs_without_ray(tmp_path, quickstart_data, mlflow_server, monkeypatch, capfd):
    """GPU machines without Ray: torchrun trains (2 processes), generation and evaluation run in-process, and
    nothing may start or join a Ray cluster. Its console is the quiet one (tract_dist/console.py). It tracks to
    a real ``mlflow server`` over HTTP, as a team's runs do, and reads the runs back as the UI shows them.
    Stage 2 learns from gold-checked CoTs (#24): two CoTs per prompt, each read out as it is written, the
    nearest to the gold score kept; the counts on the console, the build_stage2 run and state.json."""
    import ray

    import tract_dist.runtime.ray_cluster as ray_cluster
    from tract_dist.pipeline import run_pipeline

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started by a pipeline configured without it")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray_cluster, "init_ray", no_ray)  # every start-up or connection goes through it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = _cfg(tmp_path, quickstart_data, **{"cluster.launcher": "torchrun", "generation.ray": False,
                                         "evaluation.ray": False, "training.max_steps": 2,
                                         "data.max_examples": 4, "tracking.tracking_uri": uri,
                                         "generation.num_cots": 2, "generation.select": "nearest"})
    monkeypatch.delenv("TRACT_DIST_VERBOSE", raising=False)
    s = run_pipeline(cfg, name="noray")
    assert [k for k, v in s.stages.items() if v["status"] == "ran"] == [
        "train_stage1", "generate", "build_stage2", "train_stage2",
        "evaluate_stage1_vicuna_cot_rail", "evaluate_stage2_vicuna_cot_rail"]
    _check_quiet_console(capfd.readouterr(), s)
    for stage in ("train_stage1", "train_stage2"):
        run_dir = Path(s.stages[stage]["outputs"]["run_dir"])
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert len(json.loads((run_dir / "train_result.json").read_text())["params_per_rank"]) == 2
    rows = [json.loads(x) for x in (tmp_path / "pipe" / "noray" / "stage2.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["feedback"] for r in rows)
    _check_selection(s, rows)
    assert {v["status"] for v in run_pipeline(cfg, name="noray").stages.values()} == {"skipped"}
    _check_mlflow_as_users_compare(uri, s, quickstart_data)


def _check_selection(s, rows) -> None:
    """generation.num_cots=2, select=nearest: of each prompt's two CoTs the one whose stored read-out is nearer
    its gold score is the one stage 2 trains on; the counts are in state.json (and the console, MLflow)."""
    from tract_dist.generate.shards import read_generated

    sel = s.stages["build_stage2"]["outputs"]["selection"]
    assert (sel["rule"], sel["cots_before"], sel["kept"], sel["prompts_kept"], sel["no_readout"]) == (
        "nearest", 8, 4, 4, 0)
    gen = {r["uid"]: r for r in read_generated(s.stages["generate"]["outputs"]["dir"]) if r["status"] == "ok"}
    assert len(gen) == 8 and all(r["yhat"] is not None for r in gen.values())
    for row in rows:
        ex = row["id"].split("#")[0]
        errs = {j: abs(gen[f"{ex}#cot{j}"]["yhat"] - row["score"]) for j in range(2)}
        assert row["id"] == f"{ex}#cot{min(errs, key=lambda j: (errs[j], j))}"
    assert sel["mae_after"] <= sel["mae_before"]


def _check_quiet_console(cap, s) -> None:
    """What a newcomer's terminal shows (stdout and stderr at the file-descriptor level, torchrun's ranks
    included): a start and a finish line per stage, the stages' own progress lines, no library chatter (each of
    the markers below was on it before, #15); the ranks' output is in their run folders' logs/."""
    lines = [x for x in (cap.out + cap.err).split("\n") if x.strip()]
    ran = [k for k, v in s.stages.items() if v["status"] == "ran"]
    stage_lines = [x for x in lines if x.startswith("[pipeline] ")]
    assert len(stage_lines) == 2 * len(ran), stage_lines
    for k, start, done in zip(ran, stage_lines[::2], stage_lines[1::2]):
        assert start == f"[pipeline] {k}: running" and done.startswith(f"[pipeline] {k}: done in "), (start, done)
    own = [x for x in lines if not x.startswith("[pipeline] ")]
    # per training stage: its data line, the plan line and a step line per logging step (2); generation and each
    # evaluation: a backend line and a progress bar; the stage-2 selection's line; a tracking warning per export
    # at most
    assert len(own) <= 2 * (1 + 1 + 2) + 2 + 1 + 2 * 2 + 2, "\n".join(own)
    assert sum(x.startswith("[stage2] select=nearest (tolerance 0.5, fallback nearest): kept 4 of 8 CoTs")
               for x in own) == 1, "\n".join(own)
    assert sum(x.startswith("[train] step ") for x in own) == 4
    for chatter in ("built successfully", " INFO ", "Saving the dataset", "Loading weights", "UserWarning",
                    "Setting ds_accelerator", "View run"):
        assert not [x for x in lines if chatter in x], chatter
    for stage in ("train_stage1", "train_stage2"):
        logs = Path(s.stages[stage]["outputs"]["run_dir"]) / "logs"
        rank0, rank1 = (logs / "train-rank0.log").read_text(), (logs / "train-rank1.log").read_text()
        assert "[train] step 2/2" in rank0 and rank1.strip()  # rank 1 prints no console line: all its log is chatter


def _check_mlflow_as_users_compare(uri: str, s, data: Path) -> None:
    """What the MLflow UI shows of a finished pipeline (issue #17), read back through a plain MlflowClient."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("pipe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    parent = c.get_run(s.parent_run_id)
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{s.parent_run_id}'")
    trains = {r.data.tags["model_stage"]: r for r in children if r.data.tags["stage"] == "train"}
    evals = {r.data.tags["model_stage"]: r for r in children if r.data.tags["stage"] == "evaluate"}
    assert set(trains) == set(evals) == {"stage1", "stage2"}
    (build,) = [r for r in children if r.data.tags["stage"] == "build_stage2"]
    sel = s.stages["build_stage2"]["outputs"]["selection"]
    assert build.data.params["select.rule"] == "nearest"
    assert {k: build.data.metrics[f"select.{k}"] for k in ("kept", "dropped", "cots_before")} == {
        k: sel[k] for k in ("kept", "dropped", "cots_before")}
    assert build.data.metrics["select.mae_before"] == pytest.approx(sel["mae_before"])
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)

    # Headline metrics on the parent equal the children's; the methods' settings as params.
    for stage, ev in evals.items():
        for m in ("pearson", "spearman", "kendall", "rmse", "n", "failed"):
            if f"vicuna.{m}" in ev.data.metrics:
                assert parent.data.metrics[f"{stage}.vicuna.cot_rail.{m}"] == ev.data.metrics[f"vicuna.{m}"]
    assert parent.data.metrics["stage2.vicuna.cot_rail.n"] + parent.data.metrics["stage2.vicuna.cot_rail.failed"] \
        == 6  # the benchmark's max_examples
    p = parent.data.params
    assert (p["method"], p["lam"], p["ce_on_score_token"]) == ("tract", "1.0", "False")
    assert p["rail_normalize"] == evals["stage2"].data.params["rail_normalize"]
    for stage in ("stage1", "stage2"):
        assert (p[f"{stage}.train_steps"], p[f"{stage}.train_examples"]) == ("2", "4")

    # Datasets: each run's own, all of them on the parent; a model per export.
    def inputs(run):
        return {i.dataset.name: (i.dataset.digest, json.loads(i.dataset.profile)["num_rows"])
                for i in c.get_run(run.info.run_id).inputs.dataset_inputs}

    assert set(inputs(trains["stage1"])) == {data.stem} and set(inputs(trains["stage2"])) == {"stage2"}
    assert inputs(trains["stage2"])["stage2"][1] == 4 and inputs(evals["stage1"])["vicuna"][1] == 6
    assert inputs(evals["stage1"]) == inputs(evals["stage2"])  # the same 6 records: the same digest
    assert inputs(parent) == {**inputs(trains["stage1"]), **inputs(trains["stage2"]), **inputs(evals["stage1"])}
    # The runs table at a glance (#23): short distinct names, Source and User set.
    assert parent.info.run_name == "noray"
    assert sorted(r.info.run_name for r in children) == ["eval-stage1-vicuna", "eval-stage2-vicuna", "stage1-generate",
                                                        "stage1-train", "stage2-data", "stage2-train"]
    for run in [parent, *children]:
        assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
        assert run.data.tags["mlflow.user"]
    # MLflow 3 logged models, as the Models tab and the run pages list them: one per export, named after its
    # stage and pipeline, produced by its training run, the input of the runs that used it, carrying the
    # evaluation's metrics on the benchmark.
    models = {m.name: m for m in c.search_logged_models([exp.experiment_id])}
    assert set(models) == {"stage1-noray", "stage2-noray"}
    gen = next(r for r in children if r.data.tags["stage"] == "generate")
    for stage, run in trains.items():
        m = models[f"{stage}-noray"]
        assert m.source_run_id == run.info.run_id and str(m.status).endswith("READY")
        assert [o.model_id for o in c.get_run(run.info.run_id).outputs.model_outputs] == [m.model_id]
        assert "MLmodel" in {a.path for a in c.list_logged_model_artifacts(m.model_id)}
        assert [i.model_id for i in c.get_run(evals[stage].info.run_id).inputs.model_inputs] == [m.model_id]
        pearson = {x.key: x for x in c.get_logged_model(m.model_id).metrics}.get("vicuna.pearson")
        if "vicuna.pearson" in evals[stage].data.metrics:  # (undefined when every prediction is equal)
            assert (pearson.value, pearson.dataset_name) == (evals[stage].data.metrics["vicuna.pearson"], "vicuna")
    assert [i.model_id for i in c.get_run(gen.info.run_id).inputs.model_inputs] == [models["stage1-noray"].model_id]
    # The printed URL opens the runs table (not the GenAI overview) in the view the pipeline published: Source,
    # User, Models, Dataset and the headline columns shown (MLflow's shared-view tag, as its UI reads it).
    assert (f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=tract-dist"
            in s.render())
    view = json.loads(c.get_experiment(exp.experiment_id).tags["mlflow.sharedViewState.tract-dist"])
    assert view["selectedColumns"][:4] == ["attributes.`Source`", "attributes.`User`", "attributes.`Models`",
                                           "attributes.`Dataset`"]
    assert {"metrics.`vicuna.pearson`", "metrics.`loss`", "params.`method`"} <= set(view["selectedColumns"])
    assert {f"metrics.`{k}`" for k in parent.data.metrics if k.endswith(".pearson")} <= set(view["selectedColumns"])
    for stage, run in trains.items():
        # Per-step training curves: each value MLflow holds is the one metrics.jsonl has for that step.
        steps = {r["step"]: r for r in map(json.loads, (Path(s.stages[f"train_{stage}"]["outputs"]["run_dir"]) /
                                                         "metrics.jsonl").read_text().splitlines())}
        for m in ("loss", "ce", "mse", "mae", "grad_norm", "lr"):
            hist = c.get_metric_history(run.info.run_id, m)
            assert sorted(h.step for h in hist) == [1, 2]
            assert all(h.value == pytest.approx(steps[h.step][m], rel=1e-6, nan_ok=True) for h in hist)
    charts = {a.path for a in c.list_artifacts(s.parent_run_id, "charts")}
    assert charts == {"charts/pearson_by_benchmark.png", "charts/scatter-stage1-vicuna-cot_rail.png",
                      "charts/scatter-stage2-vicuna-cot_rail.png"}
