"""The quality benchmark's report (benchmarks/quality/report.py) on a synthetic work dir: cells in the pipeline
layout and in the runner's older layout (train/, eval-<mode>/), aggregated the same way."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUALITY = REPO / "benchmarks" / "quality"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, QUALITY / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report():
    return _load("quality_report", "report.py")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval(folder: Path, pearson: float, rmse: float, test: list[dict], predictions: list[float | None]) -> None:
    """An evaluation folder as evaluate_model writes it; the CoTs are the task's own (correct) annotations."""
    folder.mkdir(parents=True)
    overall = {"pearson": pearson, "spearman": pearson, "kendall": pearson, "rmse": rmse, "failed": 0, "n": len(test)}
    (folder / "summary.json").write_text(json.dumps({"stepcheck": {"overall": overall}}))
    _write_jsonl(folder / "stepcheck" / "predictions.jsonl",
                 [{"id": r["id"], "gold": r["score"], "prediction": p, "detail": {"cots": [r["feedback"]]}}
                  for r, p in zip(test, predictions)])


def _metrics(run: Path, grad_norms: list[float]) -> None:
    _write_jsonl(run / "metrics.jsonl", [{"grad_norm": g, "ce": 2 * g, "mse": 3 * g} for g in grad_norms])


def test_report_aggregates_both_cell_layouts(report, tmp_path):
    make_task = _load("quality_make_task_r", "make_task.py")
    work = tmp_path / "work"
    train, test = make_task.make_task(10, 10, seed=0, variant="reference")
    make_task.write_jsonl(train, work / "data" / "train.jsonl")
    make_task.write_jsonl(test, work / "data" / "test.jsonl")
    settings = {"model": "smollm2", "train_examples": 10, "test_examples": 10, "task_seed": 0,
                "task_variant": "reference", "learning_rate": 1e-4, "micro_batch_size": 2, "grad_accum": 1,
                "epochs": 1.0, "lam": 0.5, "warmup_ratio": 0.1, "max_new_tokens": 128, "gen_temperature": 0.0}
    (work / "settings.json").write_text(json.dumps(settings))
    cells = work / "cells"
    # cot_raft seed 0: the older runner's layout
    _eval(cells / "cot_raft-s0" / "eval-cot_rail", 0.5, 1.0, test, [1.0, 2.0, 3.0] + [None] * 7)
    _metrics(cells / "cot_raft-s0" / "train", [float(i) for i in range(1, 13)])
    # cot_raft seed 1 and tract seed 0: pipeline folders (state.json names the runs)
    for cell, stage, pearson in (("cot_raft-s1", "stage1", 0.7), ("tract-s0", "stage2", 0.9)):
        run = cells / cell / f"{cell}-{stage}-abcd1234"
        _metrics(run, [10.0] * 25)
        (cells / cell / "state.json").write_text(json.dumps({"stages": {f"train_{stage}": {
            "fingerprint": "f", "outputs": {"model": str(run / "export" / "model"), "run_dir": str(run)},
            "paths": []}}}))
        _eval(cells / cell / "evaluate" / f"{stage}-stepcheck-cot_rail", pearson, 0.5, test, [4.0] * 10)
    _metrics(cells / "tract-s0" / "train", [99.0])  # a stale older-layout run: the state's run wins
    timings = {"cot_raft-s0": {"train": 10.0, "train_threads": 2, "eval_cot_rail": 5.0},
               "cot_raft-s1": {"train": 20.0}, "tract-s0": {"generate": 7.0}, "raft-s5": {"train": 1.0}}

    out = tmp_path / "out" / "quality"
    report.write_report(work, settings, [0, 1], out, timings, None, "The analysis.", "python run_quality.py",
                        expected_rows=2)
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["results"]
    assert list(rows) == ["cot_raft (cot_rail)", "tract (cot_rail)"]
    agg = rows["cot_raft (cot_rail)"]["aggregate"]
    assert agg["pearson"]["n"] == 2 and agg["pearson"]["mean"] == pytest.approx(0.6)
    assert agg["pearson"]["std"] == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))
    s0 = rows["cot_raft (cot_rail)"]["seeds"]["0"]
    assert s0["grad_norm_first10"] == pytest.approx(5.5)  # steps 1..10
    assert s0["mse_last20"] == pytest.approx(3 * 6.5)  # all 12 steps (fewer than 20)
    assert s0["pred_mean"] == pytest.approx(2.0) and s0["pred_std"] == pytest.approx(math.sqrt(2 / 3))
    assert s0["step_verdict_acc"] == 1.0 and s0["step_quote_acc"] == 1.0  # the annotated CoTs are right
    tract = rows["tract (cot_rail)"]
    assert list(tract["seeds"]) == ["0"] and tract["seeds"]["0"]["grad_norm_first10"] == 10.0
    assert data["status"] == "partial"  # tract has one of the two seeds
    assert data["wall_s_per_method_all_seeds"] == {"cot_raft": 35.0, "tract": 7.0}  # threads and seed 5 left out
    md = out.with_suffix(".md").read_text()
    assert "| cot_raft (cot_rail) | 0.5 | 0.600 ± 0.141 |" in md
    assert "| tract (cot_rail) | 0.5 | 0.900 ± 0.000 (n=1) |" in md
    assert md.rstrip().endswith("The analysis.")


def test_runner_phases_name_the_pipeline_stages(report):
    """Each runner phase selects stages that the pipeline of that method has (one process per phase)."""
    sys.path.insert(0, str(QUALITY))
    try:
        runner = _load("quality_runner", "run_quality.py")
    finally:
        sys.path.remove(str(QUALITY))
    from tract_dist.config import load_config
    from tract_dist.pipeline import build_stages

    for method in report.METHODS + report.select_methods(["weighted"]):
        modes = [report.main_mode(method)] + report.EXTRA_MODES.get(method, [])
        over = [f"pipeline.method={'tract' if report.is_tract(method) else method}", "pipeline.evaluate_stage1=false"]
        cfg = load_config(None, over, base={"model": {"name_or_path": "tiny-llama"}, "evaluation": {"benchmarks": [
            {"name": report.BENCH, "path": "t.jsonl", "format": "jsonl"}]}})
        names = [s.name for s in build_stages(cfg, Path("/nonexistent"), "p")]
        if report.is_tract(method):
            names[0] = "stage1_export"  # the runner starts TRACT from the cot_raft cell's export
        phases = runner.cell_phases(method, modes)
        assert sorted(st for _, sts in phases for st in sts) == sorted(names)  # each stage in one phase
        assert [p for p, _ in phases][:1] == (["generate"] if report.is_tract(method) else ["train"])


def test_selection_cell_config_and_report(report, tmp_path):
    """A gold-checked selection cell (#24): tract from the cot_raft cell's export with k sampled CoTs, the rule,
    and stage 2 held to the others' step budget; its report row carries the selection's counts."""
    sys.path.insert(0, str(QUALITY))
    try:
        runner = _load("quality_runner_sel", "run_quality.py")
    finally:
        sys.path.remove(str(QUALITY))
    make_task = _load("quality_make_task_s", "make_task.py")
    work = tmp_path / "work"
    train, test = make_task.make_task(10, 10, seed=0, variant="annotator")
    make_task.write_jsonl(train, work / "data" / "train.jsonl")
    make_task.write_jsonl(test, work / "data" / "test.jsonl")
    a = runner.main.__globals__["argparse"].Namespace(
        model="smollm2", tokenizer=None, dtype="bfloat16", train=10, test=10, task_seed=0, variant="annotator",
        lr=1e-4, micro=2, accum=1, epochs=1.0, lam=0.5, warmup=0.1, max_new_tokens=64, eval_batch=4,
        gen_temperature=0.0, select_rules=["weighted"], select_k=4, select_temperature=1.0, select_tolerance=0.5,
        select_fallback="nearest")
    settings = runner.settings_from_args(a)
    assert settings["select"]["steps"] == 5  # ceil(10 / 2): cot_raft's 5 steps, whatever stage 2 keeps
    stage1 = work / "cells" / "cot_raft-s0" / "run" / "export" / "model"
    stage1.mkdir(parents=True)
    (stage1 / "config.json").write_text("{}")
    (work / "cells" / "cot_raft-s0" / "state.json").write_text(json.dumps(
        {"stages": {"train_stage1": {"outputs": {"model": str(stage1)}}}}))
    cfg = runner._config(runner.cell_overrides(settings, "tract_weighted", 0, "tr.jsonl", "te.jsonl", work))
    g = cfg.generation
    assert (cfg.pipeline.method, cfg.pipeline.stage1_export, g.num_cots, g.temperature, g.select) == (
        "tract", str(stage1), 4, 1.0, "weighted")
    assert cfg.training.max_steps == 5 and cfg.pipeline.evaluate_stage1 is False

    # its report row: the selection's counts from state.json, stage-2 CoTs right weighted by their weights
    (work / "settings.json").write_text(json.dumps(settings))
    cell = work / "cells" / "tract_weighted-s0"
    run = cell / "tract_weighted-s0-stage2-abcd1234"
    _metrics(run, [1.0] * 5)
    sel = {"within_0.5_before": 0.4, "within_0.5_after": 0.7, "cots_before": 40, "kept": 40, "mae_before": 0.9,
           "mae_after": 0.5}
    (cell / "state.json").write_text(json.dumps({"stages": {
        "train_stage2": {"outputs": {"model": str(run / "export" / "model"), "run_dir": str(run)}},
        "build_stage2": {"outputs": {"selection": sel}}}}))
    other = next(ex for ex in train[1:] if ex["score"] > 1)  # a right step to call wrong
    wrong = other["feedback"].replace("so it is right", "so it is wrong").replace("this one holds", "this one fails") \
        .replace("is correct:", "is incorrect:")
    assert wrong != other["feedback"]
    _write_jsonl(cell / "stage2.jsonl", [{**train[0], "id": train[0]["id"] + "#cot0", "weight": 3.0},
                                         {**other, "id": other["id"] + "#cot2", "feedback": wrong, "weight": 1.0}])
    _eval(cell / "evaluate" / "stage2-stepcheck-cot_rail", 0.8, 0.4, test, [3.0] * 10)
    report.write_report(work, settings, [0], tmp_path / "q", {}, None, None, "cmd", expected_rows=1)
    row = json.loads((tmp_path / "q.json").read_text())["results"]["tract_weighted (cot_rail)"]["seeds"]["0"]
    assert row["stage2_cots_all_right"] == pytest.approx(3.0 / 4.0)  # the right CoT weighs 3, the wrong one 1
    assert (row["select_within_0.5_before"], row["select_within_0.5_after"], row["select_kept"]) == (0.4, 0.7, 40)
    md = (tmp_path / "q.md").read_text()
    assert "| tract_weighted | 1.000 ± 0.000 |" in md and "0.400 ± 0.000 -> 0.700 ± 0.000 | 40 -> 40 |" in md
    assert "k = 4 CoTs per training prompt" in md
