"""The generic stage engine (tract_dist/pipeline/engine.py) on a two-stage toy pipeline: what runs, what is
skipped, what a changed key or a lost output re-runs, what a failure leaves, and the events it reports (it prints
nothing). The TRACT stage list on it: tests/test_pipeline_guards.py (pinned fingerprints) and test_pipeline.py."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tract_dist.config import ConfigError
from tract_dist.pipeline.engine import Stage, StageOutputs, StageState, check_selection, selector, walk


@dataclass(frozen=True)
class FileOut(StageOutputs):
    path: str
    summary: str = ""

    def paths(self) -> list[str]:
        return [self.path]


def _toy(tmp: Path, calls: list[str], b_setting: int = 1, fail_b: bool = False) -> list[Stage]:
    def run_a(f, fp):
        calls.append("a")
        (tmp / "a.txt").write_text("A")
        return FileOut(str(tmp / "a.txt"))

    def run_b(f, fp):
        calls.append("b")
        if fail_b:
            raise RuntimeError("b broke")
        (tmp / f"b-{fp[:8]}.txt").write_text(Path(f.out(a).path).read_text() + "B")
        return FileOut(str(tmp / f"b-{fp[:8]}.txt"))

    a: Stage[FileOut] = Stage("a", (), key=lambda f: ("a", 1), run=run_a, outputs=FileOut)
    b: Stage[FileOut] = Stage("b", (a,), key=lambda f: ("b", f.fp(a), b_setting), run=run_b, outputs=FileOut)
    return [a, b]


def _walk(tmp: Path, stages, events, patterns=None, dry=False):
    state = StageState(tmp / "state.json")
    return walk(stages, state, selector(patterns, stages, "x.stages"), key="x.stages", dry=dry,
                progress=events.append)


def test_runs_skips_and_reruns_by_fingerprint(tmp_path, capsys):
    calls, events = [], []
    stages = _toy(tmp_path, calls)
    plan = _walk(tmp_path, stages, events, dry=True).plan
    assert {k: v.status for k, v in plan.items()} == {"a": "to run", "b": "to run"} and not calls and not events
    # a stage's fingerprint: the first 12 hex digits of SHA-256 over its key as canonical JSON (literal here,
    # independent of the library's digest function)
    want_a = hashlib.sha256(json.dumps(["a", 1], sort_keys=True).encode()).hexdigest()[:12]
    assert plan["a"].fingerprint == want_a

    done = _walk(tmp_path, stages, events)
    assert calls == ["a", "b"] and [(e.stage, e.kind) for e in events] == [
        ("a", "running"), ("a", "done"), ("b", "running"), ("b", "done")]
    assert events[1].paths == (str(tmp_path / "a.txt"),) and events[1].seconds >= 0
    assert {k: r["status"] for k, r in done.records.items()} == {"a": "ran", "b": "ran"}
    assert capsys.readouterr() == ("", "")  # the engine reports through the callback only

    calls.clear(), events.clear()
    again = _walk(tmp_path, _toy(tmp_path, calls), events)
    assert calls == [] and [(e.stage, e.kind) for e in events] == [("a", "skipped"), ("b", "skipped")]
    assert again.finished.out(stages[1]).path == done.finished.out(stages[1]).path

    calls.clear()
    _walk(tmp_path, _toy(tmp_path, calls, b_setting=2), [])  # b's own setting: b only
    assert calls == ["b"]
    # a recorded output that is gone: a runs again; b's key holds a's fingerprint, unchanged, so b stays up to date
    (tmp_path / "a.txt").unlink()
    calls.clear()
    _walk(tmp_path, _toy(tmp_path, calls, b_setting=2), [])
    assert calls == ["a"]


def test_a_failure_is_reported_and_keeps_the_finished_stages(tmp_path):
    calls, events = [], []
    with pytest.raises(RuntimeError, match="b broke"):
        _walk(tmp_path, _toy(tmp_path, calls, fail_b=True), events)
    assert [(e.stage, e.kind) for e in events][-1] == ("b", "failed") and str(events[-1].error) == "b broke"
    assert list(json.loads((tmp_path / "state.json").read_text())["stages"]) == ["a"]
    calls.clear()
    _walk(tmp_path, _toy(tmp_path, calls), [])
    assert calls == ["b"]


def test_selection_refuses_a_stage_whose_input_has_not_run(tmp_path):
    calls: list[str] = []
    stages = _toy(tmp_path, calls)
    selected = selector(["b"], stages, "x.stages")
    plan = walk(stages, StageState(tmp_path / "state.json"), selected, key="x.stages", dry=True).plan
    assert {k: v.status for k, v in plan.items()} == {"a": "not selected", "b": "waiting"}
    with pytest.raises(ConfigError, match="x.stages: stage b needs a, which has not run"):
        check_selection(stages, plan, selected, "x.stages")
    with pytest.raises(ConfigError, match=r"x.stages: 'c\*' matches no stage of this pipeline \(a, b\)"):
        selector(["c*"], stages, "x.stages")
    assert not calls


def test_the_engine_knows_no_tract_stage_and_prints_nothing():
    """Generic: no TRACT stage, method or section named in its code, no print."""
    import tract_dist.pipeline.engine as engine

    tree = ast.parse(Path(engine.__file__).read_text())
    strings = " ".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    for name in ("train_stage", "generate", "build_stage2", "evaluate_", "cot_rail", "stage1", "mlflow", "ray"):
        assert name not in strings.lower(), name
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and
                n.module.startswith(("tract_dist.pipeline.tract", "tract_dist.train", "tract_dist.tracking"))]
