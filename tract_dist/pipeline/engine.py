"""A generic engine for a list of resumable stages: what each stage hashes, what it returns, what is up to date.

A :class:`Stage` names its inputs (the stages before it whose outputs it reads), a ``key`` (what its fingerprint
hashes: its own settings, its inputs' fingerprints, data files) and how it runs; it returns a dataclass of
:class:`StageOutputs`, recorded in ``state.json`` (:class:`StageState`) under the stage's name with that
fingerprint. :func:`walk` skips every stage whose fingerprint and outputs are unchanged, runs the selected rest
in order, and reports each step to a callback (:class:`StageEvent`): the engine prints nothing, knows no stage
by name and resumes an interrupted stage only through the stage's own mechanism (its body decides).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Literal, TypeVar

from tract_dist.config import ConfigError
from tract_dist.fsutil import CorruptStateError, atomic_write_json
from tract_dist.identity import json_digest

STAGE_FINGERPRINT_DIGITS = 12  # what every state.json and stage folder name recorded (folder names use 8)


@dataclass(frozen=True)
class StageOutputs:
    """Base of the stage outputs: a record in ``state.json`` and the files whose existence keeps it valid."""

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "StageOutputs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in rec.items() if k in names})

    def paths(self) -> list[str]:
        raise NotImplementedError


O = TypeVar("O", bound=StageOutputs)


class Finished:
    """The stages finished so far (run now or up to date): their fingerprints and outputs."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, StageOutputs | None]] = {}  # None: will run (a dry walk)

    def __contains__(self, stage: "Stage[Any]") -> bool:
        return stage.name in self._done

    def add(self, stage: "Stage[Any]", fp: str, outputs: StageOutputs | None) -> None:
        self._done[stage.name] = (fp, outputs)

    def fp(self, stage: "Stage[Any]") -> str:
        return self._done[stage.name][0]

    def out(self, stage: "Stage[O]") -> O:
        return self._done[stage.name][1]  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class Stage(Generic[O]):
    """One step of a pipeline.

    ``key(finished)``: what its fingerprint hashes; ``run(finished, fp)``: do the work, return ``outputs``.
    Both read only the outputs and fingerprints of ``inputs``, which come before it in the list."""

    name: str
    inputs: tuple["Stage[Any]", ...]
    key: Callable[[Finished], tuple[Any, ...]]
    run: Callable[[Finished, str], O]
    outputs: type[O]


def stage_fingerprint(key: tuple[Any, ...]) -> str:
    """A stage's fingerprint: the digest of its key (:mod:`tract_dist.identity`)."""
    return json_digest(key, STAGE_FINGERPRINT_DIGITS)


@dataclass(frozen=True)
class StagePlan:
    """``status``: ``up to date``, ``to run``, ``not selected`` (outside the selection) or ``waiting`` (an
    input is neither up to date nor selected); ``fingerprint``: None while waiting."""

    status: str
    fingerprint: str | None


@dataclass(frozen=True)
class StageEvent:
    """What :func:`walk` reports: a stage ``skipped`` (up to date), ``running``, ``done`` (``seconds``, the
    output ``paths``) or ``failed`` (``seconds``, the ``error``, which propagates after the report)."""

    stage: str
    kind: Literal["skipped", "running", "done", "failed"]
    seconds: float = 0.0
    paths: tuple[str, ...] = ()
    error: BaseException | None = None


Progress = Callable[[StageEvent], None]


class StageState:
    """``state.json``: one record per finished stage (atomic rewrite, fsutil) and whatever else its owner keeps
    beside them in ``data`` (e.g. a tracking run id)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorruptStateError(
                    f"{path}: the pipeline state is corrupt ({type(e).__name__}: {e}); restore it, or remove it to "
                    "rerun every stage (finished training runs resume from their own checkpoints)") from None
            if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
                raise CorruptStateError(f"{path}: the pipeline state has no 'stages' mapping; restore it or "
                                        "remove it to rerun every stage")
            self.data = data

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, name: str, fp: str) -> dict[str, Any] | None:
        rec = self.data["stages"].get(name)
        if rec and rec.get("fingerprint") == fp and all(Path(p).exists() for p in rec.get("paths", [])):
            return rec
        return None

    def outputs(self, stage: Stage[O], rec: dict[str, Any]) -> O:
        try:
            return stage.outputs.from_record(rec.get("outputs") or {})  # type: ignore[return-value]
        except TypeError as e:
            raise CorruptStateError(f"{self.path}: the record of stage {stage.name} is incomplete ({e}); restore "
                                    "the file, or remove the stage's record to rerun it") from None

    def record(self, name: str, fp: str, outputs: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        rec = {"fingerprint": fp, "outputs": outputs, "paths": paths, "finished_at": time.time()}
        self.data["stages"][name] = rec
        self.save()
        return rec


def selector(patterns: list[str] | None, stages: list[Stage[Any]], key: str) -> Callable[[str], bool]:
    """Shell patterns over stage names as a predicate (None: every stage); a pattern that matches no stage is a
    ConfigError naming the config ``key`` and listing the stages."""
    if patterns is None:
        return lambda _name: True
    names = [s.name for s in stages]
    for pat in patterns:
        if not fnmatch.filter(names, pat):
            raise ConfigError(f"{key}: '{pat}' matches no stage of this pipeline ({', '.join(names)})")
    return lambda n: any(fnmatch.fnmatchcase(n, pat) for pat in patterns)


def check_selection(stages: list[Stage[Any]], plan: dict[str, StagePlan], selected: Callable[[str], bool],
                    key: str) -> None:
    """Before anything runs: every selected stage's inputs are up to date or selected too."""
    for st in stages:
        if selected(st.name) and plan[st.name].status == "waiting":
            missing = [i.name for i in st.inputs if plan[i.name].status in ("waiting", "not selected")]
            raise ConfigError(f"{key}: stage {st.name} needs {', '.join(missing)}, which has not run with "
                              "these settings; select it too, or run it first")


@dataclass
class WalkResult:
    """What a walk found and did: ``finished`` (fingerprints, outputs), ``plan`` (every stage's status),
    ``records`` (the state.json record of each stage skipped or run, with ``status``: skipped or ran)."""

    finished: Finished
    plan: dict[str, StagePlan]
    records: dict[str, dict[str, Any]]


def walk(stages: list[Stage[Any]], state: StageState, selected: Callable[[str], bool], *, key: str,
         dry: bool = False, progress: Progress | None = None) -> WalkResult:
    """Skip what is up to date, run what is selected; ``dry``: only say what would happen (a stage's fingerprint
    needs only its inputs' fingerprints, so a dry walk knows every one it would run). ``key``: the config key of
    the selection, named by errors."""
    report = progress or (lambda _event: None)
    finished = Finished()
    status: dict[str, str] = {}
    fps: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for st in stages:
        waiting = [i.name for i in st.inputs if i not in finished]
        if waiting:
            if selected(st.name) and not dry:
                raise ConfigError(f"{key}: stage {st.name} needs {', '.join(waiting)}, which has not run "
                                  "with these settings; select it too, or run it first")
            status[st.name] = "waiting"
            continue
        fp = fps[st.name] = stage_fingerprint(st.key(finished))
        rec = state.done(st.name, fp)
        if rec is not None:
            status[st.name] = "up to date"
            finished.add(st, fp, state.outputs(st, rec))
            if not dry:
                report(StageEvent(st.name, "skipped"))
                records[st.name] = {**rec, "status": "skipped"}
            continue
        if not selected(st.name):
            status[st.name] = "not selected"
            continue
        if dry:
            status[st.name] = "to run"
            finished.add(st, fp, None)
            continue
        report(StageEvent(st.name, "running"))
        t0 = time.monotonic()
        try:
            out = st.run(finished, fp)
        except BaseException as e:
            report(StageEvent(st.name, "failed", time.monotonic() - t0, error=e))
            raise
        report(StageEvent(st.name, "done", time.monotonic() - t0, tuple(out.paths())))
        records[st.name] = {**state.record(st.name, fp, out.record(), out.paths()), "status": "ran"}
        finished.add(st, fp, out)
        status[st.name] = "ran"
    return WalkResult(finished, {k: StagePlan(v, fps.get(k)) for k, v in status.items()}, records)
