"""What is checked and hashed before any stage starts: config fingerprints, the model source, the data files.

Shared by the pipeline and by each stage's own command (``train``, ``generate``, ``evaluate``, ``judge``), so a
bad path fails in the driver with a :class:`~tract_dist.config.ConfigError` naming the config key, before a
worker starts or a model downloads, and a stage's identity is computed one way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tract_dist.config import Config, ConfigError


# Keys added after pipelines were made, hashed only once set away from their default (which computes what the
# configs before them computed), so the folders made before them keep their fingerprints and resume.
LATER_KEYS: dict[str, dict[str, object]] = {
    "data": {"enable_thinking": False},
    "loss": {"lam_warmup_steps": 0},
    "generation": {"max_length": None},
    "evaluation": {"cot_se_target": 0.1, "max_cots": 8, "sample_single_cot": False},
}
# What builds the stage-2 data from the CoTs, not the CoTs themselves (the generation stage does not hash them).
SELECTION_KEYS = ("select", "select_tolerance", "select_fallback")
LAYOUT_KEYS = ("packing", "max_tokens_per_micro_batch", "group_by_length")
"""training keys that change how a step is computed, not what: outside every fingerprint."""


def hashed_section(cfg: Config, section: str) -> dict[str, object]:
    """``cfg.<section>`` as fingerprints hash it: later keys at their defaults left out (``LATER_KEYS``), and
    for ``generation`` the selection keys too (the build_stage2 stage hashes them: :func:`selection_key`)."""
    d = getattr(cfg, section).model_dump()
    for key, default in LATER_KEYS.get(section, {}).items():
        if d.get(key) == default:
            d.pop(key, None)
    if section == "generation":
        for key in SELECTION_KEYS:
            d.pop(key, None)
    return d


def selection_key(cfg: Config) -> tuple[object, ...]:
    """What the stage-2 data depend on beyond the CoTs: nothing for ``select: all`` (the data every pipeline
    built before selection existed), else the rule, tolerance and fallback."""
    g = cfg.generation
    return () if g.select == "all" else ((g.select, g.select_tolerance, g.select_fallback),)


def fingerprint(cfg: Config, *extra: str) -> str:
    """Hash of everything that changes what a stage computes (not where it runs or how it is tracked).

    Pipeline names, training-run names and stage fingerprints are built on it: changing what it covers renames
    every existing run folder (they would no longer resume)."""
    d = {s: hashed_section(cfg, s) for s in ("model", "data", "loss", "training")}
    for key in ("output_dir", "num_to_keep"):  # where and how many checkpoints: the same computation
        d["training"].pop(key, None)
    # How a step's samples are laid out (padded, grouped, packed) changes only the summation order: the same
    # run may switch it when it resumes (e.g. packing on a GPU cluster with flash-attention).
    for key in LAYOUT_KEYS:
        d["training"].pop(key, None)
    if d["training"].get("global_batch_size") is None:  # unset: the rule of every earlier version, same hash
        d["training"].pop("global_batch_size", None)
    blob = json.dumps(d, sort_keys=True) + "|".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def check_model_source(name: str, key: str = "model.name_or_path") -> None:
    """A local-looking model path that does not exist is a ConfigError naming ``key`` (not an HF traceback)."""
    from tract_dist.data.assets import ALIASES, MODEL_ALIASES
    from tract_dist.train.model_init import RANDOM_ALIASES, TINY_ALIAS

    from tract_dist.storage import is_uri

    if name in ALIASES + (TINY_ALIAS, *RANDOM_ALIASES) or is_uri(name):  # a URI: fetched (and checked) by each node
        return
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids: "name" or "org/name"
    if looks_local and not p.exists():
        raise ConfigError(f"{key}: '{name}' does not exist; give a local HF directory, a hub "
                          f"name like org/model, or an alias ({', '.join(MODEL_ALIASES + (TINY_ALIAS,))})")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not p.exists():
        raise ConfigError(f"{key}: '{name}' is not local and HF_HUB_OFFLINE=1")


def preflight(cfg: Config) -> None:
    """Fail before any worker starts on what can be checked here (model source, tokenizer, loss choice)."""
    from tract_dist.train.model_init import RANDOM_ALIASES, TINY_ALIAS

    name = cfg.model.name_or_path
    check_model_source(name)
    if (name == TINY_ALIAS or name in RANDOM_ALIASES) and not cfg.model.tokenizer:
        raise ConfigError(f"model.tokenizer: required with model.name_or_path={name} (e.g. smollm2, llama3)")
    if cfg.loss.impl not in ("fused", "reference"):
        raise ConfigError(f"loss.impl: unknown {cfg.loss.impl}")


def check_data_files(cfg: Config) -> dict[str, str]:
    """The local data files the pipeline reads (training set, every benchmark), each checked to exist now.

    A missing benchmark would otherwise surface only after both training stages; relative paths resolve
    against the working directory, which the message names. ``hf:`` sources are left to the readers.
    Returns {config key: absolute path}."""
    wanted = {"data.train_path": cfg.data.train_path}
    wanted.update({f"evaluation.benchmarks[{i}].path": b.path for i, b in enumerate(cfg.evaluation.benchmarks)})
    found: dict[str, str] = {}
    for key, path in wanted.items():
        if not path or path.startswith("hf:"):
            continue
        p = Path(path)
        if not p.is_file():
            where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            what = "is not a file" if p.exists() else "does not exist"
            raise ConfigError(f"{key}: '{path}' {what}{where}")
        found[key] = str(p.resolve())
    return found


def check_real_init(cfg: Config) -> Path:
    """``pipeline.real_init``, checked to be an exported HF model folder (REAL puts its own LoRA on it)."""
    given = cfg.pipeline.real_init or ""
    p = Path(given).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"pipeline.real_init: '{given}' is not an exported model folder (no config.json); give "
                          "e.g. RUN_DIR/export/model")
    return p.resolve()


def check_stage1_export(cfg: Config) -> Path | None:
    """``pipeline.stage1_export``, checked to be a model folder (HF weights or a LoRA adapter); None if unset."""
    given = cfg.pipeline.stage1_export
    if given is None:
        return None
    p = Path(given).expanduser()
    if not p.is_dir():
        raise ConfigError(f"pipeline.stage1_export: '{given}' is not a folder (give a stage-1 export, e.g. "
                          "RUN_DIR/export/model)")
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise ConfigError(f"pipeline.stage1_export: '{given}' holds no config.json or adapter_config.json; "
                          "is it an exported model folder?")
    return p.resolve()
