"""DeepSpeed behind the strategy (#30 item 5): only ``train/strategy.py`` imports DeepSpeed, the session the
recipes use is one typed protocol, and ``nonfinite.json`` has one reader. Cheap: no process group, no engine
(the ZeRO-3 runs of test_training.py / test_real_stage.py exercise the strategy's calls end to end)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "tract_dist"

# The one place DeepSpeed is imported, and the one exception: the planner's memory figures call DeepSpeed's
# estimator (estimate_zero3_model_states_mem_needs), which is arithmetic on parameter counts, no engine.
OWNER = "train/strategy.py"
EXCEPTIONS = {"plan/memory.py": {"deepspeed.runtime.zero.stage3"}}


def _deepspeed_imports(path: Path) -> set[str]:
    """Modules named by ``import``/``from`` statements of ``path`` that are DeepSpeed or transformers' glue to it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if isinstance(node, ast.ImportFrom) and node.module == "transformers.integrations":
            names += [f"transformers.integrations.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] == "deepspeed" or "integrations.deepspeed" in n
                  or n.endswith("HfDeepSpeedConfig")}
    return found


def test_only_the_strategy_imports_deepspeed():
    by_file = {str(p.relative_to(PKG)): _deepspeed_imports(p) for p in sorted(PKG.rglob("*.py"))}
    assert {"deepspeed", "transformers.integrations.deepspeed"} <= by_file[OWNER]  # the scan sees imports
    stray = {f: sorted(mods - EXCEPTIONS.get(f, set())) for f, mods in by_file.items()
             if f != OWNER and mods - EXCEPTIONS.get(f, set())}
    assert not stray, f"DeepSpeed belongs behind {OWNER}: {stray}"


def test_both_sessions_implement_the_protocol_the_recipe_types():
    from tract_dist.train.session import LocalSession, RaySession, TrainingSession

    members = [n for n, v in vars(TrainingSession).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert set(members) == {"report", "begin", "abort", "commit", "pin", "resume_dir"}
    for cls in (LocalSession, RaySession):
        for name in members:
            want = list(inspect.signature(getattr(TrainingSession, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
    local = LocalSession("/nonexistent", fingerprint="fp")
    for attr in TrainingSession.__annotations__:  # launcher, fingerprint, last_good
        assert hasattr(local, attr), attr
    assert local.launcher == "local" and RaySession.launcher == "ray"


def test_nonfinite_record_is_written_once_and_read_back_by_its_one_reader(tmp_path):
    from tract_dist.train.guards import (NONFINITE, NonFiniteLossError, read_nonfinite, refuse_known_nonfinite,
                                         stop_nonfinite)
    from tract_dist.train.session import LocalSession

    session = LocalSession(tmp_path / "checkpoints", fingerprint="fp")
    session.last_good = str(tmp_path / "checkpoints" / "step-2")
    Path(session.last_good).mkdir(parents=True)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=nan.*step-2"):
        stop_nonfinite(3, {"loss": float("nan")}, ["a", "b"], session, tmp_path, 0, "inv-1")
    assert (Path(session.last_good) / "PINNED").is_file()  # later saves cannot prune it

    info = read_nonfinite(tmp_path, "inv-1")
    assert info is not None and info["step"] == 3 and info["values"] == {"loss": "nan"}
    assert info["record_ids"] == ["a", "b"] and info["launcher"] == "local"
    with pytest.raises(NonFiniteLossError, match="step 3"):  # a worker restarted in the same invocation
        refuse_known_nonfinite(tmp_path, "inv-1")

    assert read_nonfinite(tmp_path, "inv-2") is None  # a rerun (another invocation) is not refused
    refuse_known_nonfinite(tmp_path, "inv-2")
    assert read_nonfinite(tmp_path, None) is None
    (tmp_path / NONFINITE).write_text("{not json")
    assert read_nonfinite(tmp_path, "inv-1") is None
    (tmp_path / NONFINITE).write_text(json.dumps(["inv-1"]))
    assert read_nonfinite(tmp_path, "inv-1") is None


def test_partition_at_load_turns_transformers_zero3_switch_on_and_outside_zero3_sets_it_aside():
    from transformers.integrations import is_deepspeed_zero3_enabled

    from tract_dist.config import TrainingSection
    from tract_dist.train.strategy import DeepSpeedStrategy, build_ds_config, outside_zero3

    for stage in (2, 3):
        ds = build_ds_config(TrainingSection(zero_stage=stage), 1, bf16=False, gpu=False)
        strategy = DeepSpeedStrategy(use_cuda=False)
        strategy.partition_at_load(ds)
        assert is_deepspeed_zero3_enabled() == (stage == 3)
        with outside_zero3():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled() == (stage == 3)  # put back
        del strategy
