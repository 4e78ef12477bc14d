"""An export folder as an MLflow model, so that a run in the MLflow UI leads to the weights it served or scored.

Two forms, chosen by size:
- ``transformers``: the folder saved with MLflow's transformers flavour (``mlflow.transformers.save_model``
  given the checkpoint path, which copies the files without loading the model) and uploaded as the run's
  ``model`` artifact; ``mlflow.transformers.load_model(uri)`` then rebuilds it anywhere.
- ``pointer``: for weights over ``max_copy_bytes`` (a 7B export is ~14 GB; copying it into the artifact
  store on every serve would double the disk and the time), the artifact holds the folder's small files
  (config, tokenizer, the export record) and ``tract_pointer.json`` with the folder's absolute path, host,
  size and content fingerprint, so the registered version names exactly which weights it is.

With a ``registered_model_name`` the artifact is registered as a new version of that model. Everything goes
through an ``MlflowClient`` bound to the run's URI (never the fluent API, which sets MLFLOW_TRACKING_URI for
the whole process, see :mod:`tract_dist.tracking.mlflow_run`), and, tracking being an observer, a failure is a
counted warning and ``None``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tract_dist.tracking.mlflow_run import RunHandle, _client, _failed, _warn

DEFAULT_MAX_COPY_BYTES = 4 << 30
"""Largest folder copied into the artifact store: a 1-2B model in bf16 (and SmolLM2-135M in fp32, 0.5 GB)
is copied; 7B and up are logged as pointers."""
_SMALL_FILE_BYTES = 32 << 20  # files copied into a pointer artifact (tokenizer.json of Llama-3 is ~9 MB)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


@dataclass(frozen=True)
class LoggedModel:
    kind: str  # "transformers" or "pointer"
    model_uri: str  # runs:/RUN_ID/ARTIFACT_PATH
    size_bytes: int
    registered_name: str | None = None
    version: str | None = None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def log_model_folder(handle: RunHandle, folder: str | Path, *, artifact_path: str = "model",
                     registered_model_name: str | None = None, max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES,
                     task: str = "text-generation") -> LoggedModel | None:
    """Log ``folder`` (an HF model folder, e.g. a TRACT export) into the run; register it when a name is given."""
    if not handle.enabled:
        return None
    src = Path(folder)
    try:
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json (not an HF model folder)")
        size = folder_size(src)
        client = _client(handle.tracking_uri)
        with tempfile.TemporaryDirectory(prefix="tract-mlflow-model-") as tmp:
            out = Path(tmp) / artifact_path
            kind = "transformers" if size <= max_copy_bytes else "pointer"
            if kind == "transformers":
                try:
                    _save_transformers(src, out, task)
                except Exception as e:  # noqa: BLE001 - a folder the flavour cannot describe is still pointed to
                    shutil.rmtree(out, ignore_errors=True)
                    kind = "pointer"
                    why = f"MLflow's transformers flavour could not save it ({type(e).__name__}: {str(e)[:200]})"
                    _warn(f"{src}: {why}; logged as a pointer to the folder")
                    _save_pointer(src, out, size, why)
            else:
                _save_pointer(src, out, size)
            client.log_artifacts(handle.run_id, str(out), artifact_path)
            _record_in_runs_table(client, handle.run_id, out, artifact_path)
        client.set_tag(handle.run_id, "tract.model", json.dumps({"kind": kind, "path": str(src.resolve()),
                                                                 "size_bytes": size}))
        uri = f"runs:/{handle.run_id}/{artifact_path}"
        version = None
        if registered_model_name:
            version = _register(client, registered_model_name, uri, handle.run_id, kind)
        return LoggedModel(kind, uri, size, registered_model_name if version else None, version)
    except Exception as e:  # noqa: BLE001 - tracking observes; the work goes on
        _failed(f"logging model folder {src}", e)
        return None


def _record_in_runs_table(client: Any, run_id: str, out: Path, artifact_path: str) -> None:
    """Add the model to the run's ``mlflow.log-model.history`` tag, as ``mlflow.<flavor>.log_model`` does:
    the runs table's Models column and the run page's model link read that tag, not the artifacts. A pointer
    is recorded with a ``tract_pointer`` flavour (no MLmodel: nothing MLflow could load)."""
    from mlflow.models import Model

    mlmodel = out / "MLmodel"
    model = Model.load(str(mlmodel)) if mlmodel.is_file() else Model(
        flavors={"tract_pointer": {"pointer": "tract_pointer.json"}})
    model.run_id, model.artifact_path = run_id, artifact_path
    try:
        client._record_logged_model(run_id, model)  # the client's hook behind Model.log (no public equivalent)
    except Exception as e:  # noqa: BLE001 - the model is logged; only the table's link is missing
        _failed(f"recording model {artifact_path} in run {run_id}'s model history", e)


def _save_transformers(src: Path, out: Path, task: str) -> None:
    import mlflow.transformers
    import torch
    import transformers

    # A checkpoint path (not a loaded model): MLflow copies the files and writes its MLmodel, no weights loaded.
    # Requirements are given, not inferred: inference loads the model in a subprocess (a minute here) and
    # fails where torchvision is absent (this project's CPU environment).
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    # Its two warnings about a local folder (no hub model card, no licence found) say nothing about an export
    # and would be the only MLflow lines on a quiet console: ERROR only while saving.
    logger = logging.getLogger("mlflow.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        mlflow.transformers.save_model(transformers_model=str(src), path=str(out), task=task, pip_requirements=reqs)
    finally:
        logger.setLevel(level)


def _save_pointer(src: Path, out: Path, size: int,
                  why: str = "weights over the copy limit stay in place; load them from path on host") -> None:
    from tract_dist.fsutil import content_fingerprint, host

    out.mkdir(parents=True)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    for rel in files:
        p = src / rel
        if not rel.endswith(_WEIGHT_SUFFIXES) and p.stat().st_size <= _SMALL_FILE_BYTES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out / rel)
    pointer = {"kind": "pointer", "path": str(src.resolve()), "host": host(), "size_bytes": size,
               "content_fingerprint": content_fingerprint(src), "files": files,
               "why": why}
    (out / "tract_pointer.json").write_text(json.dumps(pointer, indent=2) + "\n", encoding="utf-8")


def _register(client: Any, name: str, uri: str, run_id: str, kind: str) -> str:
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet (the store answers RESOURCE_DOES_NOT_EXIST)
        client.create_registered_model(name, description="TRACT judge exports (tract-dist)")
    mv = client.create_model_version(name, source=uri, run_id=run_id, tags={"tract.kind": kind})
    return str(mv.version)
