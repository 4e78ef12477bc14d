"""The one in-memory shape every reader produces: a judge example in the Prometheus absolute-grading frame."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tract_dist.errors import TractError


class DataError(TractError, ValueError):
    """Bad input data; the message names the file, the record index and the field."""

    def __init__(self, path: str, message: str, index: int | None = None, field_name: str | None = None):
        where = str(path)
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.index = index
        self.field = field_name


@dataclass
class JudgeExample:
    """One absolute-grading example.

    ``score`` is the gold y*; evaluation labels may be means (e.g. 3.67), training labels are integers.
    ``feedback`` is the chain of thought without any trailing score statement (may be None for eval sets).
    ``weight`` is an optional real weight of the example in the training loss (stage-2 selection weights;
    None: unweighted, and left out of written records).
    """

    id: str
    instruction: str
    response: str
    criteria: str
    score_descriptions: list[str]
    score: float
    reference_answer: str | None = None
    feedback: str | None = None
    category: str | None = None
    weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weight"] is None:  # unweighted records keep the schema (and content hashes) they always had
            del d["weight"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JudgeExample":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


# Columns of the project's normalised JSONL, in file order; the optional ones are written only when set.
OPTIONAL_JSONL_FIELDS = ("weight",)
JSONL_FIELDS = [f.name for f in fields(JudgeExample) if f.name not in OPTIONAL_JSONL_FIELDS]
