"""Driver side of a training stage: preflight checks, data preparation, MLflow run, then the launcher.

Launchers: ``ray`` (Ray Train ``TorchTrainer``: a local Ray by default, or a cluster address), ``torchrun``
(``torch.distributed.run`` on this machine; the GPU check machines have no Ray) and ``inline`` (one process,
for debugging). All three call the same :func:`tract_dist.train.worker.train_worker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tract_dist.config import Config, ConfigError
from tract_dist.tracking import RunHandle, log_artifact, log_params, start_run


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    export_dir: Path
    checkpoint_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    data_summary: dict[str, Any]


def fingerprint(cfg: Config, *extra: str) -> str:
    """Hash of everything that changes what a stage computes (not where it runs or how it is tracked)."""
    d = cfg.model_dump(include={"model", "data", "loss", "training"})
    d["training"].pop("output_dir", None)
    blob = json.dumps(d, sort_keys=True) + "|".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def preflight(cfg: Config) -> None:
    """Fail before any worker starts on what can be checked here."""
    from tract_dist.data.assets import ALIASES
    from tract_dist.train.model_init import RANDOM_ALIASES, TINY_ALIAS

    name = cfg.model.name_or_path
    if name not in ALIASES + (TINY_ALIAS, *RANDOM_ALIASES):
        p = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids: "name" or "org/name"
        if looks_local and not p.exists():
            raise ConfigError(f"model.name_or_path: '{name}' does not exist; give a local HF directory, a hub "
                              f"name like org/model, or an alias ({', '.join(ALIASES[2:] + (TINY_ALIAS,))})")
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not p.exists():
            raise ConfigError(f"model.name_or_path: '{name}' is not local and HF_HUB_OFFLINE=1")
    if (name == TINY_ALIAS or name in RANDOM_ALIASES) and not cfg.model.tokenizer:
        raise ConfigError(f"model.tokenizer: required with model.name_or_path={name} (e.g. smollm2, llama3)")
    if cfg.loss.impl not in ("fused", "reference"):
        raise ConfigError(f"loss.impl: unknown {cfg.loss.impl}")


def check_batch(cfg: Config, n_examples: int) -> None:
    t = cfg.training
    world = cfg.cluster.num_workers
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    if global_batch > n_examples:
        raise ConfigError(
            f"training: a global batch of {global_batch} samples (micro_batch_size {t.micro_batch_size} x "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps} x cluster.num_workers {world}) exceeds "
            f"the {n_examples} training examples; lower one of them or add data")


def run_training(cfg: Config, *, config_path: str | None = None, run_name: str | None = None,
                 launcher: str = "ray", address: str | None = None, parent: RunHandle | None = None,
                 stage: str = "train") -> TrainResult:
    """Run one CoT-RAFT training stage; rerunning with the same config and name resumes it."""
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.train.data import prepare_dataset

    preflight(cfg)
    name = run_name or cfg.tracking.run_name or f"{stage}-{fingerprint(cfg)}"
    run_dir = Path(cfg.training.output_dir).resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_name = cfg.model.tokenizer or cfg.model.name_or_path
    summary = prepare_dataset(cfg, load_tokenizer(tok_name), run_dir)
    check_batch(cfg, summary["encode_encoded"])
    print(f"[train] data: {summary['records']} records, {summary['valid']} valid, {summary['invalid']} invalid, "
          f"{summary['encode_truncated']} truncated, {summary['encode_dropped']} dropped", flush=True)

    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.exists() else None
    tr = cfg.tracking
    with start_run(tr.tracking_uri, tr.experiment, name, enabled=tr.enabled, parent=parent, run_id=previous,
                   tags={"stage": stage}) as handle:
        if handle.run_id:
            id_file.write_text(handle.run_id)
            if previous is None:
                log_params(handle, cfg.flat())
                if config_path:
                    log_artifact(handle, config_path, "config")
                log_artifact(handle, run_dir / "data_summary.json", "data")
        loop = {"config": cfg.model_dump(), "run_dir": str(run_dir), "launcher": launcher,
                "tracking": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id},
                "export_dir": str(run_dir / "export")}
        if os.environ.get("TRACT_DIST_FAIL_AT_STEP"):
            loop["fail_at_step"] = int(os.environ["TRACT_DIST_FAIL_AT_STEP"])
        if launcher == "ray":
            ckpt = _fit_with_ray(cfg, loop, name, address)
        elif launcher == "torchrun":
            ckpt = _fit_with_torchrun(cfg, loop, run_dir)
        elif launcher == "inline":
            from tract_dist.train.worker import train_worker

            train_worker(loop)
            ckpt = str(run_dir / "checkpoints")
        else:
            raise ConfigError(f"unknown launcher {launcher!r}: ray, torchrun or inline")
    return TrainResult(name, run_dir, run_dir / "export", ckpt, handle.run_id, handle.tracking_uri, summary)


def ray_init(cfg: Config, address: str | None) -> None:
    """Connect to ``address`` / ``cluster.address`` / RAY_ADDRESS, or start a local Ray for this machine."""
    from tract_dist.runtime.ray_cluster import init_ray

    env = {"DS_ACCELERATOR": "cuda" if cfg.cluster.use_gpu else "cpu", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "TOKENIZERS_PARALLELISM": "false"}
    if not cfg.cluster.use_gpu:
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.cluster.cpus_per_worker)))
    init_ray(address or cfg.cluster.address, num_cpus=cfg.cluster.local_num_cpus or 2 * (os.cpu_count() or 1),
             need_cpus=cfg.cluster.num_workers * cfg.cluster.cpus_per_worker,
             object_store_memory_mb=cfg.cluster.object_store_memory_mb, env_vars=env)


def check_placement(cfg: Config) -> None:
    import ray

    c = cfg.cluster
    have = ray.cluster_resources()
    need = {"CPU": c.num_workers * c.cpus_per_worker, **{k: c.num_workers * v for k, v in
                                                        c.resources_per_worker.items()}}
    if c.use_gpu:
        need["GPU"] = need.get("GPU", c.num_workers)
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise ConfigError(f"cluster.num_workers={c.num_workers} cannot be placed ({detail}); lower "
                          f"cluster.num_workers or cluster.cpus_per_worker, or add nodes")


def _fit_with_ray(cfg: Config, loop: dict[str, Any], name: str, address: str | None) -> str:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tract_dist.train.worker import train_worker

    ray_init(cfg, address)
    check_placement(cfg)
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **c.resources_per_worker}
    storage = str(Path(c.storage_path).resolve()) if "://" not in c.storage_path else c.storage_path
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.checkpoint.path if result.checkpoint else ""


def _fit_with_torchrun(cfg: Config, loop: dict[str, Any], run_dir: Path) -> str:
    spec = run_dir / "loop.json"
    spec.write_text(json.dumps(loop))
    n = cfg.cluster.num_workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "tract_dist.train.torchrun_main", str(spec)]
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if cfg.cluster.use_gpu else "cpu"}
    if not cfg.cluster.use_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.cluster.cpus_per_worker))))
    subprocess.run(cmd, check=True, env=env)
    return str(run_dir / "checkpoints")
