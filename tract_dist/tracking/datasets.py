"""Training data, stage-2 data and benchmarks as MLflow dataset inputs, so the runs table's Dataset column
says what each run read (name, source, digest, record count) and two runs on the same data show the same
digest.

MLflow keeps one dataset per (experiment, name, digest) and reuses it for every later input with that pair,
profile included: a digest must therefore change whenever the record count could, so it hashes the content
identity (a file's content fingerprint, or a hub dataset's name and split), the selection (offset, limit) and
the count. Entities are built directly (no pandas/HF dataset object is loaded just to be described), and
logged through an ``MlflowClient`` bound to the run's URI like every other tracking call here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tract_dist.tracking.mlflow_run import RunHandle, _client, _failed, redact_text

CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT: shown beside the name
TRAINING = "training"
EVALUATION = "evaluation"
_HUB_PREFIX = "hf:"  # data.formats: "hf:NAME" reads a Hugging Face hub dataset


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset as logged: ``records`` is the number of examples the run used."""

    name: str
    path: str
    digest: str
    records: int
    context: str
    profile: dict[str, Any] = field(default_factory=dict)  # extra counts (read, invalid, dropped, ...)

    def source(self) -> tuple[str, str]:
        """(source_type, source JSON) in the shape of MLflow's own local / Hugging Face sources."""
        if self.path.startswith(_HUB_PREFIX):
            return "hugging_face", json.dumps({"path": self.path[len(_HUB_PREFIX):]})
        p = Path(self.path)
        uri = p.resolve().as_uri() if "://" not in self.path else redact_text(self.path)
        return "local", json.dumps({"uri": uri})


def file_dataset(name: str, path: str, records: int, context: str, *, selection: dict[str, Any] | None = None,
                 profile: dict[str, Any] | None = None) -> DatasetRecord:
    """A data file (or ``hf:NAME``) used with ``records`` examples; ``selection``: what picked them (limit,
    offset, split), part of the digest."""
    from tract_dist.identity import file_fingerprint, json_digest

    digest = json_digest((file_fingerprint(path), selection or {}, records), 10)
    return DatasetRecord(name, path, digest, int(records), context, dict(profile or {}))


def examples_dataset(name: str, path: str, examples: Iterable[Any], context: str, *,
                     profile: dict[str, Any] | None = None) -> DatasetRecord:
    """A dataset digested over the examples themselves (``to_dict()`` of each, in order): a benchmark's
    digest names exactly the records scored, whatever file, split or limit they came from."""
    from tract_dist.identity import examples_digest

    digest, n = examples_digest(examples)
    return DatasetRecord(name, path, digest, n, context, dict(profile or {}))


def _entity(rec: DatasetRecord) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source = rec.source()
    profile = json.dumps({"num_rows": rec.records, **rec.profile})
    return DatasetInput(Dataset(name=rec.name, digest=rec.digest, source_type=source_type, source=source,
                                profile=profile), tags=[InputTag(CONTEXT_TAG, rec.context)])


def log_datasets(handle: RunHandle, datasets: list[DatasetRecord]) -> None:
    """Log ``datasets`` as inputs of the run (idempotent: MLflow links a (name, digest) to a run once)."""
    if not handle.enabled or not datasets:
        return
    try:
        _client(handle.tracking_uri).log_inputs(handle.run_id, datasets=[_entity(d) for d in datasets])
    except Exception as e:  # noqa: BLE001 - tracking observes
        _failed(f"logging {len(datasets)} dataset inputs", e)


def copy_dataset_inputs(client: Any, run_ids: Iterable[str], dest: RunHandle) -> int:
    """Give ``dest`` (the pipeline's run) every dataset input of ``run_ids`` (its stages); returns how many
    distinct datasets it now has from them."""
    got: dict[tuple[str, str], Any] = {}
    for rid in run_ids:
        for di in client.get_run(rid).inputs.dataset_inputs:
            got.setdefault((di.dataset.name, di.dataset.digest), di)
    if got and dest.enabled:
        client.log_inputs(dest.run_id, datasets=list(got.values()))
    return len(got)
