"""Driver side of a training stage: preflight checks, data preparation, MLflow run, then the launcher.

Launchers: ``ray`` (Ray Train ``TorchTrainer``: a local Ray by default, or a cluster address), ``torchrun``
(``torch.distributed.run`` on this machine; the GPU check machines have no Ray) and ``inline`` (one process,
for debugging). All three call the same :func:`tract_dist.train.worker.train_worker`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tract_dist.config import Config, ConfigError
from tract_dist.console import CONSOLE
from tract_dist.errors import RunFailure
from tract_dist.fsutil import atomic_write_json, atomic_write_text, exclusive_lock, read_json
from tract_dist.identity import file_fingerprint, fingerprint, hashed_section
from tract_dist.runtime.ray_cluster import check_placement, init_ray_from_config
from tract_dist.tracking import RunHandle, log_artifact, log_params, redact_text, start_run
from tract_dist.train.hooks import installed_hooks
from tract_dist.train.plan import WorkerPlan
from tract_dist.train.preflight import preflight
from tract_dist.train.session import StaleResumeError

log = logging.getLogger(__name__)

WHERE_REAL_RUNS = ("rollout_workers", "rollout_cpus", "rollout_gpus", "rollout_threads", "rollout_batch_size")
"""``real.*`` keys that place the rollouts without changing a sample (per-row seeded sampling): not fingerprinted."""

RUN_RECORD = "run.json"  # the run's fingerprint, written when the run starts, checked by every later invocation


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    export_dir: Path
    checkpoint_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    data_summary: dict[str, Any]
    mlflow_model_id: str | None = None  # the export's MLflow logged model (None: not logged)
    export_uri: str | None = None  # the export published on a URI storage root (cluster.storage_path), else None


def run_fingerprint(cfg: Config, recipe: str = "train") -> str:
    """What a training run's checkpoints belong to: the config's fingerprint and the training file's content
    (and for REAL its ``real.*`` settings)."""
    if recipe == "real":
        real = {k: v for k, v in hashed_section(cfg, "real").items() if k not in WHERE_REAL_RUNS}
        return fingerprint(cfg, file_fingerprint(cfg.data.train_path or ""), "real", json.dumps(real, sort_keys=True))
    return fingerprint(cfg, file_fingerprint(cfg.data.train_path or ""))


def check_batch(cfg: Config, n_examples: int) -> None:
    """The global batch must fit in the training set (else not one optimizer step would run)."""
    from tract_dist.train.data import global_batch_size

    t = cfg.training
    world = cfg.cluster.num_workers
    global_batch = global_batch_size(t, world)
    if global_batch > n_examples:
        how = (f"training.global_batch_size {global_batch}" if t.global_batch_size is not None else
               f"micro_batch_size {t.micro_batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps} "
               f"x cluster.num_workers {world}")
        raise ConfigError(f"training: a global batch of {global_batch} samples ({how}) exceeds the {n_examples} "
                          "training examples; lower one of them or add data")


def run_training(cfg: Config, *, config_path: str | None = None, run_name: str | None = None,
                 launcher: str = "ray", address: str | None = None, parent: RunHandle | None = None,
                 stage: str = "train", fresh: bool = False, display_name: str | None = None,
                 model_name: str | None = None, recipe: str = "train") -> TrainResult:
    """Run one CoT-RAFT training stage; rerunning with the same config and name resumes it.

    ``run_name`` names the run folder (and, unless ``display_name`` is given, the MLflow run); ``model_name`` the
    export's MLflow logged model (default: the MLflow run's name). The pipeline gives short readable ones
    (``stage1-train``; ``stage1-<pipeline>``) while its folders keep their fingerprints.

    One invocation per run folder at a time (a second one fails at once, naming the holder). A run folder or
    checkpoint made with another configuration is refused, naming both fingerprints, unless ``fresh``: then
    the old run (folder and local Ray storage) is moved aside and this one starts from the seed model."""
    preflight(cfg)
    if launcher not in ("ray", "torchrun", "inline"):
        raise ConfigError(f"unknown launcher {launcher!r}: ray, torchrun or inline")
    name = run_name or cfg.tracking.run_name or f"{stage}-{fingerprint(cfg)}"
    run_dir = Path(cfg.training.output_dir).resolve() / name
    with exclusive_lock(run_dir, "training run"):
        return _run_locked(cfg, name, run_dir, config_path=config_path, launcher=launcher, address=address,
                           parent=parent, stage=stage, fresh=fresh, display_name=display_name or name,
                           model_name=model_name or display_name or name, recipe=recipe)


def _storage_dir(cfg: Config, name: str) -> Path | None:
    """The run's Ray Train storage folder when it is local (None for s3:// and the like)."""
    sp = cfg.cluster.storage_path
    return None if "://" in sp else Path(sp).resolve() / name


def _ray_checkpoint_fingerprints(storage: Path | None) -> set[str]:
    if storage is None or not storage.is_dir():
        return set()
    found = set()
    for m in storage.glob("checkpoint_*/manifest_rank*.json"):
        try:
            fp = json.loads(m.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            continue
        if fp:
            found.add(fp)
    return found


def _move_aside(path: Path) -> Path | None:
    if not path.exists():
        return None
    dest = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    return dest


def check_resume(cfg: Config, name: str, run_dir: Path, fp: str, *, fresh: bool) -> None:
    """Refuse to resume a run folder (or local Ray storage) made with another configuration, naming both
    fingerprints; with ``fresh`` move both aside instead (nothing is deleted)."""
    record = run_dir / RUN_RECORD
    old = read_json(record, "the run record").get("fingerprint") if record.exists() else None
    storage = _storage_dir(cfg, name)
    stale_ray = _ray_checkpoint_fingerprints(storage) - {fp}
    if fresh:
        for path in (run_dir, storage):
            if path is not None and (moved := _move_aside(path)) is not None:
                log.info(f"[train] --fresh: moved {path} to {moved}", extra=CONSOLE)
        if storage is None:
            log.info(f"[train] --fresh: Ray storage {cfg.cluster.storage_path} is remote; its checkpoints of {name} "
                     "are refused by fingerprint, not moved", extra=CONSOLE)
        return
    if old is not None and old != fp:
        raise StaleResumeError(
            f"{run_dir} holds a training run with fingerprint {old}, but this configuration's fingerprint is {fp} "
            f"(model, data file, loss or training settings changed): resuming would mix two runs. Use another "
            f"--run-name, or --fresh to move the old run aside and start again")
    if stale_ray:
        raise StaleResumeError(
            f"Ray Train storage {storage} holds checkpoints with fingerprint {', '.join(sorted(stale_ray))}, but "
            f"this configuration's fingerprint is {fp}: resuming would mix two runs. Use another --run-name, or "
            f"--fresh to move the old checkpoints aside")


def _run_locked(cfg: Config, name: str, run_dir: Path, *, config_path: str | None, launcher: str,
                address: str | None, parent: RunHandle | None, stage: str, fresh: bool, display_name: str,
                model_name: str, recipe: str = "train") -> TrainResult:
    from tract_dist import console

    fp = run_fingerprint(cfg, recipe)
    if launcher == "ray" and (address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        # A cluster first (a local Ray is one node, started later): unshared storage is refused before any work.
        _connect_and_check(cfg, address, run_dir)
    check_resume(cfg, name, run_dir, fp, fresh=fresh)  # --fresh moves the old folder aside: logs go in the new
    run_dir.mkdir(parents=True, exist_ok=True)
    # A quiet console (a pipeline's stage keeps the pipeline's): library chatter to RUN_DIR/logs/driver.log.
    with console.quiet_run(run_dir / "logs"):
        return _prepare_and_fit(cfg, name, run_dir, fp, config_path=config_path, launcher=launcher,
                                address=address, parent=parent, stage=stage, display_name=display_name,
                                model_name=model_name, recipe=recipe)


def _prepare_and_fit(cfg: Config, name: str, run_dir: Path, fp: str, *, config_path: str | None, launcher: str,
                     address: str | None, parent: RunHandle | None, stage: str, display_name: str,
                     model_name: str, recipe: str = "train") -> TrainResult:
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.tracking.mlflow_run import artifact_root
    from tract_dist.train.data import prepare_dataset

    tok_name = cfg.model.tokenizer or cfg.model.name_or_path
    summary = prepare_dataset(cfg, load_tokenizer(tok_name), run_dir)
    if recipe != "real":  # REAL's batch is its own round of samples (checked by real.stage)
        check_batch(cfg, summary["encode_encoded"])
    # A GGUF alias (smollm2) is de-quantised once, here, into its cached HF folder, which every worker loads.
    from tract_dist.models.loading import materialize_alias

    materialize_alias(cfg.model.name_or_path)
    # Recorded only once the input is valid: an invocation refused for bad input (then fixed) owns nothing yet.
    if not (run_dir / RUN_RECORD).exists():
        atomic_write_json(run_dir / RUN_RECORD, {"fingerprint": fp, "name": name, "created": time.time()})
    log.info(f"[train] data: {summary['records']} records, {summary['valid']} valid, {summary['invalid']} invalid, "
             f"{summary['encode_truncated']} truncated, {summary['encode_dropped']} dropped", extra=CONSOLE)

    id_file = run_dir / "mlflow_run_id"
    previous = id_file.read_text().strip() if id_file.exists() else None
    tr = cfg.tracking
    with start_run(tr.tracking_uri, tr.experiment, display_name, enabled=tr.enabled, parent=parent, run_id=previous,
                   tags={"stage": stage, "tract.run_dir": str(run_dir)}, artifact_root=artifact_root(cfg.cluster, cfg.tracking)) as handle:
        if handle.run_id:
            atomic_write_text(id_file, handle.run_id)
            if handle.run_id != previous:  # a new run (first invocation, or the old one was deleted)
                log_params(handle, cfg.flat())
                if config_path:
                    log_config_artifact(handle, config_path)
                log_artifact(handle, run_dir / "data_summary.json", "data")
                _log_training_data(handle, cfg, summary)
        invocation = uuid.uuid4().hex
        loop = WorkerPlan(config=cfg.model_dump(), run_dir=str(run_dir), launcher=launcher,
                          tracking_uri=handle.tracking_uri, run_id=handle.run_id, export_dir=str(run_dir / "export"),
                          fingerprint=fp, invocation=invocation, hooks=installed_hooks(), recipe=recipe)
        t_fit = time.perf_counter()
        try:
            if launcher == "ray":
                ckpt = _fit_with_ray(cfg, loop, name, address)
            elif launcher == "torchrun":
                ckpt = _fit_with_torchrun(cfg, loop, run_dir)
            else:
                from tract_dist.train.worker import train_worker

                train_worker(loop)
                ckpt = str(run_dir / "checkpoints")
        except Exception as e:
            _raise_nonfinite(cfg, name, run_dir, invocation, e)
            raise
        t_fit, t_log = time.perf_counter() - t_fit, time.perf_counter()
        model_id = _log_outcome(handle, cfg, run_dir, model_name)
        _record_driver_timings(run_dir, fit=t_fit, log_model=time.perf_counter() - t_log)
    result = run_dir / "train_result.json"
    export_uri = read_json(result, "the training result").get("export_uri") if result.exists() else None
    return TrainResult(name, run_dir, run_dir / "export", ckpt, handle.run_id, handle.tracking_uri, summary, model_id,
                       export_uri)


def _record_driver_timings(run_dir: Path, **seconds: float) -> None:
    """The driver's side of where a stage's time went, beside the workers' (``timings_s`` of train_result.json):
    ``fit`` (launcher start to the workers' end: start-up is ``fit`` minus the workers' own phases) and
    ``log_model`` (the export into MLflow)."""
    path = run_dir / "train_result.json"
    if not path.exists():
        return
    result = read_json(path, "the training result")
    result.setdefault("timings_s", {}).update({k: round(v, 3) for k, v in seconds.items()})
    atomic_write_json(path, result)


def _log_training_data(handle: RunHandle, cfg: Config, summary: dict[str, Any]) -> None:
    """The training file as the run's MLflow dataset input, counted as trained on (encoded), and its size as
    the ``train_examples`` param (the pipeline's run shows it beside each stage's metrics)."""
    from tract_dist.tracking.datasets import TRAINING, file_dataset, log_datasets

    path = cfg.data.train_path or ""
    n = int(summary["encode_encoded"])
    profile = {k: summary[k] for k in ("records", "valid", "invalid", "encode_truncated", "encode_dropped")
               if k in summary}
    log_datasets(handle, [file_dataset(Path(path).stem or path, path, n, TRAINING, profile=profile,
                                       selection={"max_examples": cfg.data.max_examples})])
    log_params(handle, {"train_examples": n})


def _log_outcome(handle: RunHandle, cfg: Config, run_dir: Path, model_name: str) -> str | None:
    """After a finished fit: the steps the plan ran (epochs or max_steps) as ``train_steps``, and the export
    as the run's MLflow logged model named ``model_name`` (registered under ``tracking.registered_model_name``),
    so the run leads to it; returns the model's id."""
    if not handle.enabled:
        return None
    result = run_dir / "train_result.json"
    steps = read_json(result, "the training result")["steps"] if result.exists() else 0
    if result.exists():
        log_params(handle, {"train_steps": steps})
    model = run_dir / "export" / "model"  # a LoRA adapter left unmerged is not a model folder: not logged
    if cfg.tracking.log_models and model.is_dir():
        from tract_dist.tracking.models import log_model_folder, model_name as safe_model_name

        logged = log_model_folder(handle, model, name=safe_model_name(model_name), step=int(steps),
                                  registered_model_name=cfg.tracking.registered_model_name)
        return logged.model_id if logged else None
    return None


def log_config_artifact(handle: RunHandle, config_path: str) -> None:
    """Upload the config file with any credential in a URI redacted (tracking URIs may carry tokens)."""
    import tempfile

    text = Path(config_path).read_text(encoding="utf-8", errors="replace")
    with tempfile.TemporaryDirectory(prefix="tract-config-") as d:
        copy = Path(d) / Path(config_path).name
        copy.write_text(redact_text(text), encoding="utf-8")
        log_artifact(handle, copy, "config")


def _raise_nonfinite(cfg: Config, name: str, run_dir: Path, invocation: str, error: BaseException) -> None:
    """If the workers stopped on a non-finite step in this invocation, raise one clear error (whatever the
    launcher wrapped it in) and pin the last good Ray checkpoint with hard links, out of num_to_keep's reach."""
    from tract_dist.train.guards import NonFiniteLossError, read_nonfinite

    info = read_nonfinite(run_dir, invocation)
    if info is None:
        return
    msg = info.get("message", "non-finite training values")
    if info.get("launcher") == "ray":
        pinned = _pin_ray_checkpoint(_storage_dir(cfg, name), run_dir, info)
        if pinned is not None:
            msg += f"; pinned copy of the last good checkpoint (hard links): {pinned}"
    raise NonFiniteLossError(msg) from error


def _pin_ray_checkpoint(storage: Path | None, run_dir: Path, info: dict[str, Any]) -> Path | None:
    """Hard-link the newest Ray checkpoint (the last good one: nothing was saved after it) into
    ``RUN_DIR/pinned/``; Ray Train's num_to_keep pruning deletes its own folder, never these links."""
    if storage is None or not storage.is_dir():
        return None
    ckpts = sorted((p for p in storage.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        return None
    src = ckpts[-1]
    dest = run_dir / "pinned" / src.name
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:  # another filesystem: copy
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    atomic_write_text(tmp / "PINNED", info.get("message", "") + "\n")
    os.replace(tmp, dest)
    return dest


def _fit_with_ray(cfg: Config, loop: WorkerPlan, name: str, address: str | None) -> str:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from tract_dist.runtime.node_loss import alive_nodes, failure_config, node_lost_error
    from tract_dist.storage import ray_storage, storage_uri
    from tract_dist.train.worker import train_worker

    init_ray_from_config(cfg.cluster, address)  # connected already by _connect_and_check: a no-op
    check_placement(cfg.cluster)
    c = cfg.cluster
    storage, storage_fs = ray_storage(c.storage_path)  # a URI's filesystem: credentials from the environment
    nodes = alive_nodes(ray.nodes())  # to name a node lost during the run (runtime/node_loss.py)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop.to_dict(),  # a dict: Ray Train validates its train_loop_config as one
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(**failure_config(c.max_failures, c.min_workers is not None,
                                                                           len(nodes))),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.num_to_keep)),
    )
    try:
        result = trainer.fit()
        error = result.error
    except TrainingFailedError as e:
        error = e
    if error:
        lost = None if c.min_workers is not None else node_lost_error(
            nodes, error, num_workers=c.num_workers, storage=c.storage_path, list_nodes=ray.nodes)
        if lost is not None:
            raise lost from error
        raise error
    if not result.checkpoint:
        return ""
    return storage_uri(c.storage_path, result.checkpoint.path)


def _connect_and_check(cfg: Config, address: str | None, run_dir: Path) -> None:
    """Join (or start) Ray, then refuse what the cluster cannot run: too few resources, or on several nodes a
    local storage or run folder that not every node sees (``cluster.storage_path``: runtime/storage_check.py)."""
    from tract_dist.runtime.storage_check import check_shared_storage

    init_ray_from_config(cfg.cluster, address)
    check_placement(cfg.cluster)
    check_shared_storage({"cluster.storage_path": cfg.cluster.storage_path,
                          "training.output_dir": str(run_dir.parent)})


def scaling_config(cfg: Config) -> Any:
    """Ray Train's ScalingConfig: ``cluster.num_workers`` workers, or with ``cluster.min_workers`` the elastic
    range ``(min_workers, num_workers)`` (Ray Train V2: it starts as many as the cluster can place, and restarts the
    group at another size from the latest checkpoint when workers are lost or resources appear; the worker resumes
    that checkpoint through DeepSpeed's universal format, :mod:`tract_dist.train.resume`)."""
    from ray.train import ScalingConfig

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **c.resources_per_worker}
    if c.min_workers is None:
        return ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources)
    return ScalingConfig(num_workers=(c.min_workers, c.num_workers), use_gpu=c.use_gpu,
                         resources_per_worker=resources, elastic_resize_monitor_interval_s=c.elastic_resize_interval_s)


class WorkerFailedError(RunFailure, RuntimeError):
    """The torchrun workers exited with an error (their output above says which)."""


def _fit_with_torchrun(cfg: Config, loop: WorkerPlan, run_dir: Path) -> str:
    spec = run_dir / "loop.json"
    # The file holds no credential: a tracking URI with a token travels to the workers in their environment.
    uri = loop.tracking_uri
    atomic_write_text(spec, loop.to_json(redact=redact_text))
    n = cfg.cluster.num_workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "tract_dist.train.torchrun_main", str(spec)]
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if cfg.cluster.use_gpu else "cpu",
           "TRACT_DIST_WORKER_TRACKING_URI": uri}
    if not cfg.cluster.use_gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.cluster.cpus_per_worker))))
    from tract_dist import console

    # The ranks print their console lines on the stdout they inherit: the terminal, also when this quiet driver's
    # own output goes to its log (each rank sends the rest of its output to RUN_DIR/logs, worker.py).
    out, err = console.terminal_fds()
    proc = subprocess.run(cmd, env=env, stdout=out, stderr=err)
    if proc.returncode != 0:
        raise WorkerFailedError(f"torchrun workers failed (exit status {proc.returncode}); see their output above")
    return str(run_dir / "checkpoints")
