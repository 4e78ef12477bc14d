"""An export folder as an MLflow 3 logged model, linked to the run that produced (or used) it.

MLflow 3's UI lists models in the experiment's Models tab and on each run's page from its *logged models*
(``search_logged_models``), each with its source run, params, the metrics evaluations logged against it and
its registered versions. An export becomes one through the LoggedModel API, with an ``MlflowClient`` bound to
the run's URI (never the fluent API, which sets MLFLOW_TRACKING_URI for the whole process, see
:mod:`tract_dist.tracking.mlflow_run`):

- ``transformers``: the folder saved with MLflow's transformers flavour (``mlflow.transformers.save_model``
  given the checkpoint path: files copied, no weights loaded), so ``mlflow.transformers.load_model(
  "models:/<id>")`` rebuilds it anywhere. On a local artifact store (the default ``sqlite:///mlflow.db`` keeps
  artifacts in ``./mlartifacts``) the flavour's copies of the export's files are replaced by hard links to
  them: the store holds the complete model without a second copy on disk (the export is published once and
  never rewritten in place; deleting ``runs/`` leaves the store's links whole). A remote store (an MLflow
  server) receives a real upload.
- ``external`` (a pointer): over ``max_copy_bytes`` (a 7B export is ~14 GB: uploading it on every serve would
  double the disk and the time), or where the flavour cannot describe the folder. MLflow 3's external model
  (``mlflow.model.isExternal``): an MLmodel without weights, the folder's small files (config, tokenizer, the
  export record) and ``tract_pointer.json`` with the folder's path, host, size and content fingerprint, so
  the model names exactly which weights it is.
- ``existing``: the store already holds a READY model with the same content fingerprint (an export served
  after the pipeline logged it, a stage rerun): the run is linked to it, nothing is copied again.

Names say which stage of which pipeline made the model (``stage1-pipeline-tract-<fp>``; MLflow forbids
``/ : . %`` in them). With a ``registered_model_name`` the model is also registered as a new version. Tracking
observes: every failure is a counted warning and ``None``, never an exception in the work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tract_dist.tracking.mlflow_run import RunHandle, _client, _failed, _warn

DEFAULT_MAX_COPY_BYTES = 4 << 30
"""Largest folder stored as a loadable model: a 1-2B model in bf16 (and SmolLM2-135M in fp32, 0.5 GB); 7B and up
are external (pointer) models."""
_SMALL_FILE_BYTES = 32 << 20  # files copied into a pointer model (tokenizer.json of Llama-3 is ~9 MB)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
MODEL_TYPE = "tract-judge"  # the logged models' model_type (search_logged_models can filter on it)
FINGERPRINT_TAG = "tract.content_fingerprint"
_EXTERNAL_TAG = "mlflow.model.isExternal"  # MLflow 3's marker of a model whose weights live outside the store
_BAD_NAME = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a logged model's name


@dataclass(frozen=True)
class LoggedModel:
    kind: str  # "transformers", "external" (a pointer) or "existing" (already in the store: linked)
    model_id: str
    model_uri: str  # models:/<model_id>
    name: str
    size_bytes: int
    registered_name: str | None = None
    version: str | None = None


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_name(*parts: str | None) -> str:
    """A logged model's name from readable parts (``stage1``, the pipeline's name), MLflow's forbidden
    characters replaced: the stage first, so a name cut short in the UI still says which stage it is."""
    return _BAD_NAME.sub("_", "-".join(p for p in parts if p)) or "model"


def log_model_folder(handle: RunHandle, folder: str | Path, *, name: str | None = None,
                     registered_model_name: str | None = None, max_copy_bytes: int = DEFAULT_MAX_COPY_BYTES,
                     task: str = "text-generation", step: int = 0, role: str = "output",
                     tags: dict[str, str] | None = None) -> LoggedModel | None:
    """Log ``folder`` (an HF model folder, e.g. a TRACT export) as a logged model of the run ``handle``: its
    output (``role="output"``: the run produced it) or input (``"input"``: the run serves or scores it); a model
    the store already holds is linked, not stored again. Registers it when ``registered_model_name`` is given."""
    if not handle.enabled:
        return None
    from tract_dist.identity import content_fingerprint

    src = Path(folder)
    try:
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} has no config.json (not an HF model folder)")
        client = _client(handle.tracking_uri)
        exp_id = handle.experiment_id or client.get_run(handle.run_id).info.experiment_id
        size, fp = folder_size(src), content_fingerprint(src) or ""
        existing = find_logged_model(handle, fp, experiment_id=exp_id)
        if existing is not None:
            model, kind = existing, "existing"
        else:
            model, kind = _create(client, exp_id, handle.run_id, src, name or model_name(src.name), size, fp,
                                  max_copy_bytes, task, tags or {})
        _link(client, handle.run_id, model.model_id, role, step)
        version = None
        if registered_model_name:
            version = _register(client, registered_model_name, model, handle.run_id, kind)
        return LoggedModel(kind, model.model_id, f"models:/{model.model_id}", model.name, size,
                           registered_model_name if version else None, version)
    except Exception as e:  # noqa: BLE001 - tracking observes; the work goes on
        _failed(f"logging model folder {src}", e)
        return None


def find_logged_model(handle: RunHandle, fingerprint: str | None, *, experiment_id: str | None = None) -> Any:
    """The newest READY logged model of the run's experiment whose weights have ``fingerprint`` (None if none)."""
    if not handle.enabled or not fingerprint:
        return None
    client = _client(handle.tracking_uri)
    exp_id = experiment_id or handle.experiment_id or client.get_run(handle.run_id).info.experiment_id
    found = client.search_logged_models([exp_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}])
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return ready[0] if ready else None


def link_model_input(handle: RunHandle, folder: str | Path) -> str | None:
    """Link the logged model holding ``folder``'s weights to the run as its input (an evaluation scores it);
    returns its id, so the run's metrics can be logged against it (None: not in the store, or untracked)."""
    if not handle.enabled:
        return None
    from tract_dist.identity import content_fingerprint

    try:
        model = find_logged_model(handle, content_fingerprint(folder))
        if model is None:
            return None
        _link(_client(handle.tracking_uri), handle.run_id, model.model_id, "input", 0)
        return str(model.model_id)
    except Exception as e:  # noqa: BLE001
        _failed(f"linking the logged model of {folder}", e)
        return None


def _create(client: Any, exp_id: str, run_id: str, src: Path, name: str, size: int, fp: str, max_copy_bytes: int,
            task: str, tags: dict[str, str]) -> tuple[Any, str]:
    from mlflow.entities import LoggedModelStatus

    kind = "transformers" if size <= max_copy_bytes else "external"
    why = "" if kind == "transformers" else "weights over the copy limit stay in place; load them from path on host"
    model_tags = {FINGERPRINT_TAG: fp, "tract.path": str(src.resolve()), "tract.size_bytes": str(size), **tags}
    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, tags=model_tags,
                                       params=_export_params(src), model_type=MODEL_TYPE)
    try:
        with _staging_dir(model.artifact_location) as tmp:
            out = tmp / "model"
            if kind == "transformers":
                try:
                    _save_transformers(src, out, task, model)
                except Exception as e:  # noqa: BLE001 - a folder the flavour cannot describe is still pointed to
                    shutil.rmtree(out, ignore_errors=True)
                    kind = "external"
                    why = f"MLflow's transformers flavour could not save it ({type(e).__name__}: {str(e)[:200]})"
                    _warn(f"{src}: {why}; logged as an external (pointer) model")
            if kind == "external":
                _save_pointer(src, out, size, fp, why, model)
                client.set_logged_model_tags(model.model_id, {_EXTERNAL_TAG: "true"})
            _publish(client, model, out, src, "model" if kind == "transformers" else "")
        client.set_logged_model_tags(model.model_id, {"tract.kind": kind})
        model = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    return model, kind


def _export_params(src: Path) -> dict[str, str]:
    """What the Models tab shows beside each model: its class, size class and the training record."""
    params: dict[str, str] = {}
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "torch_dtype", "dtype"):
            if config.get(key) is not None:
                params[f"config.{key}"] = str(config[key][0] if key == "architectures" else config[key])
        record = src.parent / "tract_training.json"
        record = record if record.is_file() else src / "tract_training.json"
        if record.is_file():
            for k, v in json.loads(record.read_text(encoding="utf-8")).items():
                params[f"training.{k}"] = str(v)[:500]
    except (OSError, ValueError):
        pass
    return params


def _local_dir(artifact_location: str) -> Path | None:
    """The folder of a local artifact location (``file://`` or a plain path); None for a remote store."""
    if artifact_location.startswith("file:"):
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(artifact_location))
    if "://" not in artifact_location and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", artifact_location):
        return Path(artifact_location)
    return None


class _staging_dir:  # noqa: N801 - used as a context manager, like tempfile.TemporaryDirectory
    """A temporary folder on the artifact store's own filesystem when it is local (so the model's files move into
    place by rename and can be hard links), else in the system's temporary folder; removed on exit."""

    def __init__(self, artifact_location: str):
        local = _local_dir(artifact_location)
        parent = None
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            parent = str(local.parent)
        self._tmp = tempfile.TemporaryDirectory(prefix=".tract-model-", dir=parent)

    def __enter__(self) -> Path:
        return Path(self._tmp.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self._tmp.__exit__(*exc)


def _publish(client: Any, model: Any, out: Path, src: Path, copied_under: str) -> None:
    """The model's artifacts into the store: on a local store every file copied from ``src`` (under
    ``copied_under`` in ``out``) becomes a hard link to it, then the folder moves into the model's artifact
    location; a remote store gets ``out`` uploaded."""
    dest = _local_dir(model.artifact_location)
    if dest is None:
        client.log_model_artifacts(model.model_id, str(out))
        return
    base = out / copied_under if copied_under else out
    linked = 0
    for f in base.rglob("*"):
        original = src / f.relative_to(base)
        if not f.is_file() or not original.is_file():
            continue
        a, b = f.stat(), original.stat()
        if a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns:  # copy2 keeps mtime: not a copy of it
            continue
        link = f.with_name(f.name + ".link")
        try:
            os.link(original, link)
        except OSError:  # another filesystem, or links not allowed: the copy stays
            break
        os.replace(link, f)
        linked += 1
    if dest.exists():  # MLflow made the (empty) folder: fill it
        for entry in out.iterdir():
            os.replace(entry, dest / entry.name)
    else:
        os.replace(out, dest)
    logging.getLogger(__name__).info("model %s: %d files hard-linked to %s", model.model_id, linked, src)


def _save_transformers(src: Path, out: Path, task: str, model: Any) -> None:
    import mlflow.transformers
    import torch
    import transformers
    from mlflow.models import Model

    # A checkpoint path (not a loaded model): MLflow copies the files and writes its MLmodel, no weights loaded.
    # Requirements are given, not inferred: inference loads the model in a subprocess (a minute here) and
    # fails where torchvision is absent (this project's CPU environment).
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    mlmodel = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, model_id=model.model_id,
                    run_id=model.source_run_id)
    # Its two warnings about a local folder (no hub model card, no licence found) say nothing about an export
    # and would be the only MLflow lines on a quiet console: ERROR only while saving.
    logger = logging.getLogger("mlflow.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        mlflow.transformers.save_model(transformers_model=str(src), path=str(out), task=task, pip_requirements=reqs,
                                       mlflow_model=mlmodel)
    finally:
        logger.setLevel(level)


def _save_pointer(src: Path, out: Path, size: int, fp: str, why: str, model: Any) -> None:
    from mlflow.models.utils import get_external_mlflow_model_spec

    from tract_dist.fsutil import host

    out.mkdir(parents=True)
    get_external_mlflow_model_spec(model).save(str(out / "MLmodel"))  # MLflow 3's MLmodel of an external model
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    for rel in files:
        p = src / rel
        if not rel.endswith(_WEIGHT_SUFFIXES) and p.stat().st_size <= _SMALL_FILE_BYTES:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out / rel)
    pointer = {"kind": "pointer", "path": str(src.resolve()), "host": host(), "size_bytes": size,
               "content_fingerprint": fp, "files": files, "why": why}
    (out / "tract_pointer.json").write_text(json.dumps(pointer, indent=2) + "\n", encoding="utf-8")


def _link(client: Any, run_id: str, model_id: str, role: str, step: int) -> None:
    """The run's Models (outputs: what it produced) or its inputs (what it served or scored); once each."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput

    run = client.get_run(run_id)
    if role == "input":
        if model_id not in {m.model_id for m in (run.inputs.model_inputs or [])}:
            client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    elif model_id not in {m.model_id for m in (run.outputs.model_outputs or [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])


def _register(client: Any, name: str, model: Any, run_id: str, kind: str) -> str:
    """A new version of ``name`` for the model (the version it already has when it is registered there)."""
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet (the store answers RESOURCE_DOES_NOT_EXIST)
        client.create_registered_model(name, description="TRACT judge exports (tract-dist)")
    for mv in client.search_model_versions(f"name='{name}'"):  # (3.17's sqlite registry keeps no model_id)
        if mv.source == model.artifact_location or mv.tags.get("tract.model_id") == model.model_id:
            return str(mv.version)
    # The source is the model's artifact location with its id (a "models:/<id>" source makes MLflow 3.17's
    # registry look the model up through the process-wide tracking URI, not this client's).
    mv = client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model.model_id,
                                     tags={"tract.kind": kind, "tract.model_id": model.model_id})
    return str(mv.version)
