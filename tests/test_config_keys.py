"""Every config key is documented where it is declared, and ``tract-dist config keys`` lists exactly the keys
that the config accepts, with defaults that load back as themselves."""

from __future__ import annotations

import json
import re
import typing

import pytest
from pydantic import BaseModel

from tract_dist.cli import main
from tract_dist.config import Config, ConfigError, load_config

BASE = {"model": {"name_or_path": "m"}}


def _models_reachable(model: type[BaseModel], seen: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``model`` through field annotations (unions, lists, dicts)."""
    if model in seen:
        return seen
    seen.append(model)
    stack = [f.annotation for f in model.model_fields.values()]
    while stack:
        ann = stack.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _models_reachable(ann, seen)
        stack.extend(typing.get_args(ann))
    return seen


def test_every_field_of_every_model_has_a_description():
    models = _models_reachable(Config, [])
    assert {m.__name__ for m in models} >= {"Config", "ModelSection", "LoraSection", "VllmSection", "BenchmarkSpec"}
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
               if not (f.description and f.description.strip())]
    assert missing == []


def _dumped_keys() -> list[str]:
    """Dotted keys of a full config instance's dump, in its (declaration) order: an independent key list."""
    cfg = Config.model_validate({**BASE, "evaluation": {"benchmarks": [{"name": "b", "path": "p"}]}})
    out: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
                continue
            out.append(prefix + k)
            if isinstance(v, list) and v and isinstance(v[0], dict):
                walk(v[0], f"{prefix}{k}[].")

    walk(cfg.model_dump(), "")
    return out


def _listed(capsys, *args: str) -> str:
    assert main(["config", "keys", *args]) == 0
    return capsys.readouterr().out


def test_config_keys_lists_every_declared_key_in_declaration_order(capsys):
    text = _listed(capsys)
    keys = [line.split()[0] for line in text.splitlines()]
    assert keys == _dumped_keys()
    for line in text.splitlines():  # key, type, default, then a description on every line
        assert len(re.split(r"\s{2,}", line.strip())) >= 4, line
    rows = [r for r in _listed(capsys, "--format", "markdown").splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == keys


def test_listed_types_and_defaults_come_from_the_declarations():
    from tract_dist.config_keys import config_keys

    by_key = {k.key: k for k in config_keys()}
    assert by_key["model.lora.r"].type == "int (> 0, <= 4096)"
    assert by_key["evaluation.mode"].type == "cot_rail|decode|rail"
    assert by_key["evaluation.rail_normalize"].type == "bool or null"
    assert by_key["model.name_or_path"].default == "(required)"
    assert by_key["evaluation.benchmarks[].path"].default == "(required)"
    assert json.loads(by_key["generation.stop"].default) == Config.model_validate(BASE).generation.stop


def test_every_listed_key_takes_its_listed_default_as_an_override():
    from tract_dist.config_keys import REQUIRED, config_keys

    defaults = load_config(None, base=BASE).flat()
    checked = 0
    for k in config_keys():
        if "[]" in k.key or k.default == REQUIRED:
            continue
        cfg = load_config(None, [f"{k.key}={k.default}"], base=BASE)
        assert cfg.flat()[k.key] == json.loads(k.default) == defaults[k.key], k.key
        checked += 1
    assert checked > 80


@pytest.mark.parametrize("override, key, value", [
    ("loss.lam=0.5", "loss.lam", 0.5),
    ("model.lora.r=8", "model.lora.r", 8),
    ("generation.vllm.seed=7", "generation.vllm.seed", 7),
    ("evaluation.rail_normalize=true", "evaluation.rail_normalize", True),
    ("cluster.resources_per_worker={acc: 0.5}", "cluster.resources_per_worker.acc", 0.5),
    ("generation.stop=['[END]']", "generation.stop", ["[END]"]),
])
def test_listed_keys_round_trip_through_override_syntax(override, key, value):
    from tract_dist.config_keys import config_keys

    listed = {k.key for k in config_keys()}
    assert override.split("=", 1)[0] in listed
    assert load_config(None, [override], base=BASE).flat()[key] == value


def test_list_item_keys_are_the_fields_an_item_accepts():
    from tract_dist.config_keys import config_keys

    items = {k.key.split("[].")[1]: k for k in config_keys() if k.key.startswith("evaluation.benchmarks[].")}
    spec = {name: (3 if name in ("max_examples", "offset") else "jsonl" if name == "format" else "x")
            for name in items}
    cfg = load_config(None, [f"evaluation.benchmarks=[{json.dumps(spec)}]"], base=BASE)
    assert cfg.evaluation.benchmarks[0].model_dump() == spec
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks.0.bogus: unknown key"):
        load_config(None, ["evaluation.benchmarks=[{name: a, path: p, bogus: 1}]"], base=BASE)


def test_an_unlisted_key_is_refused_by_override():
    with pytest.raises(ConfigError, match=r"loss.lamb: unknown key"):
        load_config(None, ["loss.lamb=1"], base=BASE)
