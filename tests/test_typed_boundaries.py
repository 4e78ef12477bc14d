"""Typed sections at the boundaries (#30 item 4): no public function takes its config or session as ``Any``;
``runtime/``, ``generate/`` and ``evaluate/`` take their own sections or spec, never the whole ``Config``; stage
configs are derived section by section (``Config.derive``) instead of a dump validated again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tract_dist.config import Config, load_config

PKG = Path(__file__).resolve().parents[1] / "tract_dist"
NAMES = {"cfg", "config", "session"}  # parameters that carry a configuration or the training session


def _public_functions():
    """(file, qualified name, node) of every public function and method of a public class in tract_dist."""
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                yield path, node.name, node
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                            not item.name.startswith("_") or item.name == "__init__"):
                        yield path, f"{node.name}.{item.name}", item


def _params(fn: ast.FunctionDef):
    a = fn.args
    return [*a.posonlyargs, *a.args, *a.kwonlyargs]


def test_no_public_function_takes_its_config_or_session_as_any():
    seen, loose = 0, []
    for path, name, fn in _public_functions():
        for arg in _params(fn):
            if arg.arg in NAMES:
                seen += 1
                if arg.annotation is None or ast.unparse(arg.annotation) in ("Any", "'Any'", "typing.Any"):
                    loose.append(f"{path.relative_to(PKG)}:{fn.lineno} {name}({arg.arg})")
    assert seen >= 30  # the scan finds them, so the check below can fail
    assert not loose, f"type these parameters (Config, a section, PretrainedConfig, TrainingSession): {loose}"


def test_runtime_generate_and_evaluate_take_their_own_sections_not_the_whole_config():
    """Only the spec builders (``GenerateSpec.of``, ``EvaluateSpec.of``) read the whole Config there."""
    allowed = {("generate/spec.py", "GenerateSpec.of"), ("evaluate/spec.py", "EvaluateSpec.of")}
    whole = []
    for path, name, fn in _public_functions():
        rel = str(path.relative_to(PKG))
        if rel.split("/")[0] not in ("runtime", "generate", "evaluate") or (rel, name) in allowed:
            continue
        for arg in _params(fn):
            if arg.annotation is not None and ast.unparse(arg.annotation).strip("'\"") == "Config":
                whole.append(f"{rel}:{fn.lineno} {name}({arg.arg})")
    assert not whole, f"pass a section or the package's spec instead of the whole Config: {whole}"
    spec_builders = {(str(p.relative_to(PKG)), n) for p, n, _ in _public_functions()} & allowed
    assert spec_builders == allowed  # the allowance names real functions


def _validated(cfg: Config, **sections: dict) -> Config:
    """The route Config.derive replaced: dump, update, validate again (the reference)."""
    d = cfg.model_dump()
    for name, update in sections.items():
        d[name].update({k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in update.items()})
    return Config.model_validate(d)


def test_derive_equals_dump_and_validate_and_shares_untouched_sections():
    cfg = load_config(None, ["model.name_or_path=m", "evaluation.benchmarks=[{name: a, path: x.jsonl}, "
                                                     "{name: b, path: y.jsonl}]"])
    updates = {"loss": {"lam": 0.0, "ce_on_score_token": True}, "data": {"use_cot": False, "train_path": "s2.jsonl",
                                                                         "train_format": "jsonl"},
               "training": {"output_dir": "/tmp/p"}, "tracking": {"run_name": None},
               "evaluation": {"benchmarks": [cfg.evaluation.benchmarks[1]], "mode": "rail"}}
    derived = cfg.derive(**updates)
    assert derived.model_dump() == _validated(cfg, **updates).model_dump()
    assert derived.model == cfg.model and derived.model is cfg.model  # untouched: shared, not copied
    assert cfg.loss.lam != 0.0 and cfg.data.use_cot and cfg.evaluation.mode != "rail"  # the source is unchanged
    with pytest.raises(KeyError, match="no section"):
        cfg.derive(losss={"lam": 0.0})


def test_real_stage_config_is_derived_as_the_validated_route_would_build_it(tiny_export):
    from tract_dist.real.stage import real_stage_config

    cfg = load_config(None, ["model.name_or_path=m", "model.lora.enabled=true", "real.k=4",
                             "real.prompts_per_step=2", "training.micro_batch_size=2", "cluster.num_workers=2"])
    staged = real_stage_config(cfg, tiny_export)
    r = cfg.real
    want = _validated(cfg, model={"name_or_path": tiny_export}, data={"use_cot": False},
                      training={"learning_rate": r.learning_rate, "max_steps": r.steps,
                                "gradient_accumulation_steps": 2})
    assert staged.model_dump() == want.model_dump()
