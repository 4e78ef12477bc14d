"""What training records in an export for the stages that load it, and the judge's rule for following it.

An export (``RUN_DIR/export/model``, ``RUN_DIR/export/adapter``) is a plain Hugging Face folder: nothing in it
says how the score was read out in training. A judge that reads ŷ differently from the loss it was trained
with (renormalised over the score tokens or not) scores on another scale, silently. So the export writer
leaves :data:`RECORD_NAME` beside the weights, and ``evaluation.rail_normalize`` unset follows it.

Pure Python (``json`` only): training writes it, the judge reads it, neither pulls the other in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tract_dist.config import LossSection

from tract_dist.console import CONSOLE_ERR

log = logging.getLogger(__name__)

RECORD_NAME = "tract_training.json"
"""File name of the record inside each exported model folder."""

_FORMAT = 1
_EXPORT_FOLDERS = ("model", "adapter")  # the loadable folders train/export.py writes
_warned: set[tuple[str, bool, bool]] = set()  # (record, configured, recorded): one warning per process


def training_record(loss: LossSection) -> dict[str, Any]:
    """The training choices an evaluation must repeat (the loss's read-out) plus the objective's weights."""
    return {"format": _FORMAT, "loss": {"rail_normalize": bool(loss.rail_normalize), "lam": float(loss.lam),
                                        "ce_on_score_token": bool(loss.ce_on_score_token)}}


def write_export_record(export_dir: str | Path, loss: LossSection) -> None:
    """Write the record into every loadable folder of an export being written (``model``, ``adapter``)."""
    import json

    text = json.dumps(training_record(loss), indent=2) + "\n"
    for name in _EXPORT_FOLDERS:
        folder = Path(export_dir) / name
        if folder.is_dir():
            (folder / RECORD_NAME).write_text(text, encoding="utf-8")


def recorded_rail_normalize(model_path: str | Path) -> tuple[bool, Path] | None:
    """``(loss.rail_normalize, record path)`` from the export at ``model_path``; None when it has no record
    (a hub name, an alias, a folder not written by tract-dist). A damaged record is an error naming the file."""
    from tract_dist.fsutil import CorruptStateError, read_json

    path = Path(model_path) / RECORD_NAME
    if not path.is_file():
        return None
    record = read_json(path, "the export's training record")
    value = record.get("loss", {}).get("rail_normalize") if isinstance(record, dict) else None
    if not isinstance(value, bool):
        raise CorruptStateError(f"{path}: loss.rail_normalize must be true or false, got {value!r}; restore the "
                                f"record or remove it (evaluation then reads ŷ as evaluation.rail_normalize says)")
    return value, path


def resolve_rail_normalize(configured: bool | None, model_path: str | Path) -> bool:
    """The read-out a judge of ``model_path`` uses: ``configured`` when set, else the export's record, else
    False (the paper's full-vocabulary softmax). A set value that differs from the record is used, with one
    warning naming both."""
    found = recorded_rail_normalize(model_path)
    if configured is None:
        return found[0] if found else False
    if found is not None and found[0] != configured:
        recorded, path = found
        key = (str(path), configured, recorded)
        if key not in _warned:
            _warned.add(key)
            how = {True: "renormalised over the score tokens", False: "from the full-vocabulary softmax"}
            log.warning(
                f"[judge] warning: evaluation.rail_normalize={str(configured).lower()} but {path} records that the "
                f"model was trained with loss.rail_normalize={str(recorded).lower()}: ŷ is read "
                f"{how[configured]}, not as trained ({how[recorded]}); unset evaluation.rail_normalize to "
                f"follow the export", extra=CONSOLE_ERR)
    return configured
