"""What the pipeline reads, checked before any stage starts: the data files, a given stage-1 export, REAL's
starting model. A bad path fails in the driver with a :class:`~tract_dist.config.ConfigError` naming the config
key, not after a training stage."""

from __future__ import annotations

from pathlib import Path

from tract_dist.config import Config, ConfigError


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
