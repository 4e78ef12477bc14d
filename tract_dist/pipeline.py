"""The TRACT pipeline as an ordered list of stages: stage-1 training -> CoT generation -> stage-2 dataset ->
stage-2 training (from the seed model) -> CoT-RAIL evaluation of both stages (:func:`build_stages`).

A :class:`Stage` names its inputs (the upstream stages whose outputs it reads), what its fingerprint hashes
(its own settings, its inputs' fingerprints, data files) and how it runs; it returns a dataclass of outputs,
recorded in ``state.json`` under the stage's name with that fingerprint. A rerun skips every stage whose
fingerprint and outputs are unchanged and resumes an interrupted one through the stage's own mechanism (Ray
Train checkpoints, missing generation shards). The training runs and the generation folder are named after
their stage fingerprint, so a rerun after a config change starts those stages in new folders and can never
resume another configuration's checkpoint or mix its CoTs. One invocation per pipeline at a time (a lock
beside its folder). One MLflow parent run per pipeline, a child run per stage and per benchmark.

Methods (``pipeline.method``) make the paper's baselines one override away:
``tract`` (two stages), ``cot_raft`` (stage 1 only), ``ce_cot`` (CE only, lambda = 0 with CE on the score
token; evaluated by decoding and by CoT-RAIL), ``raft`` (score-only targets without CoT; RAIL inference).
``real`` (TRACT's stages, then ``train_real``, REAL's RL stage, from the stage-2 export; or from
``pipeline.real_init``, any export, without TRACT's stages).
``pipeline.stage1_export`` starts from a finished stage-1 model instead of training one; ``pipeline.stages``
runs a subset (one stage per process, say), using the others' recorded outputs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from tract_dist import console
from tract_dist.config import Config, ConfigError
from tract_dist.fsutil import CorruptStateError, atomic_write_json, content_fingerprint, exclusive_lock, \
    file_fingerprint
from tract_dist.pipeline_checks import (check_data_files, check_stage1_export, fingerprint, hashed_section, preflight,
                                       selection_key)
from tract_dist.tracking import RunHandle, log_artifact, log_params, set_tags, start_run

EVAL_MODES = {"tract": ["cot_rail"], "cot_raft": ["cot_rail"], "ce_cot": ["decode", "cot_rail"], "raft": ["rail"],
              "real": ["cot_rail"]}


# ---- what each stage returns (recorded in state.json as a plain mapping) --------------------------------------

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


@dataclass(frozen=True)
class TrainOutputs(StageOutputs):
    model: str  # the exported HF folder (or the LoRA adapter when it is not merged)
    run_dir: str = ""  # empty for a given stage-1 export
    mlflow_run_id: str | None = None
    summary: str = ""
    mlflow_model_id: str | None = None  # the export's MLflow logged model (absent from older records)

    def paths(self) -> list[str]:
        from tract_dist.storage import is_uri

        if is_uri(self.model) and self.run_dir:  # published on a URI root: its source, the run's own export
            return [str(Path(self.run_dir) / "export" / self.model.rstrip("/").rsplit("/", 1)[-1])]
        return [self.model]


@dataclass(frozen=True)
class GenerateOutputs(StageOutputs):
    dir: str
    ok: int | None = None
    failed: int | None = None
    summary: str = ""

    def paths(self) -> list[str]:
        return [str(Path(self.dir) / "summary.json")]


@dataclass(frozen=True)
class Stage2DataOutputs(StageOutputs):
    """``build_stage2_dataset``'s statistics (tract_dist/generate/stage2.py) and the JSONL it wrote."""

    path: str
    source_examples: int | None = None
    generated_records: int | None = None
    written: int | None = None
    unusable: int | None = None
    unusable_reasons: dict[str, int] = field(default_factory=dict)
    examples_without_cot: int | None = None
    examples_without_cot_ids: list[str] = field(default_factory=list)
    unknown_example_ids: int | None = None
    duplicates: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)  # generation.select's counts (generate/select.py)
    summary: str = ""

    def paths(self) -> list[str]:
        return [self.path]


@dataclass(frozen=True)
class EvalOutputs(StageOutputs):
    metrics: dict[str, Any]
    summary: str = ""
    dir: str = ""  # the benchmark's output folder (predictions, summary.json); absent from older records

    def paths(self) -> list[str]:
        return [self.dir]


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
    """One step of the pipeline.

    ``key(finished)``: what its fingerprint hashes; ``run(finished, fp)``: do the work, return ``outputs``.
    Both read only the outputs and fingerprints of ``inputs``, which come before it in the list."""

    name: str
    inputs: tuple["Stage[Any]", ...]
    key: Callable[[Finished], tuple[Any, ...]]
    run: Callable[[Finished, str], O]
    outputs: type[O]


@dataclass
class PipelineSummary:
    name: str
    directory: Path
    method: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    def render(self) -> str:
        lines = [f"[pipeline] {self.name} ({self.method}) in {self.directory}"]
        for name, rec in self.stages.items():
            status = rec.get("status", "?")
            lines.append(f"  {name:<32} {status:<8} {rec.get('outputs', {}).get('summary', '')}")
        if self.parent_run_id:
            lines.append(f"  MLflow parent run: {self.parent_run_id}")
        if self.tracking_uri and self.experiment_id:
            from tract_dist.tracking.mlflow_run import runs_url
            from tract_dist.tracking.rollup import RUNS_VIEW_KEY

            url, serve = runs_url(self.tracking_uri, self.experiment_id, RUNS_VIEW_KEY)
            lines.append(f"  MLflow runs: {url}" + (f"  (after: {serve})" if serve else ""))
        return "\n".join(lines)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_config(cfg: Config, pdir: Path, *, train_path: str | None = None, train_format: str | None = None,
                 stage: str = "stage1") -> Config:
    """The config a training stage runs with: the method's loss/data switches, outputs under ``pdir``."""
    d = cfg.model_dump()
    method = cfg.pipeline.method
    if method == "ce_cot":
        d["loss"].update(lam=0.0, ce_on_score_token=True)
    if method == "raft":
        d["data"]["use_cot"] = False
    if train_path is not None:
        d["data"].update(train_path=train_path, train_format=train_format, max_examples=None, skip_invalid=False)
    d["training"]["output_dir"] = str(pdir)
    d["cluster"]["storage_path"] = pipeline_storage(cfg, pdir)
    d["tracking"]["run_name"] = None
    return Config.model_validate(d)


def pipeline_storage(cfg: Config, pdir: Path) -> str:
    """Ray Train's storage for the pipeline's runs: ``<pipeline>/ray`` on one machine (the default
    ``cluster.storage_path``), else ``<cluster.storage_path>/<pipeline name>`` (a URI or a shared mount)."""
    from tract_dist.storage import join

    sp = cfg.cluster.storage_path
    default = type(cfg.cluster).model_fields["storage_path"].default
    return str(pdir / "ray") if sp == default else join(sp, pdir.name)


@dataclass
class _Context:
    """What every stage's run shares: the parent MLflow run, its tags, the Ray address, ``--fresh``."""

    parent: RunHandle | None = None
    tags: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    fresh: bool = False


# ---- the pipeline, top to bottom ----------------------------------------------------------------------------

def build_stages(cfg: Config, pdir: Path, name: str, ctx: _Context | None = None) -> list[Stage[Any]]:
    """The stages of ``cfg``'s method in the order they run. Their names and fingerprints are those of every
    pipeline folder made so far (state.json keys; run and generation folders are named after them)."""
    ctx = ctx or _Context()
    method = cfg.pipeline.method
    data_fp = file_fingerprint(cfg.data.train_path or "")
    if method == "real" and cfg.pipeline.real_init is not None:
        return _real_stages(cfg, pdir, name, ctx, None, [])

    # ---- stage 1: CoT-RAFT from the seed model on annotated CoTs (or a given stage-1 export) ----------------
    export = check_stage1_export(cfg)
    s1: Stage[TrainOutputs]
    if export is None:
        s1_cfg = stage_config(cfg, pdir, stage="stage1")
        s1 = Stage("train_stage1", (),
                   key=lambda f: ("train", fingerprint(s1_cfg), data_fp),
                   run=lambda f, fp: _train(s1_cfg, f"{name}-stage1-{fp[:8]}", ctx, "stage1"),
                   outputs=TrainOutputs)
    else:
        s1 = Stage("stage1_export", (),
                   key=lambda f: ("stage1_export", content_fingerprint(export)),
                   run=lambda f, fp: TrainOutputs(model=str(export), run_dir="", summary=f"given {export}"),
                   outputs=TrainOutputs)
    stages: list[Stage[Any]] = [s1]
    evaluated: list[tuple[str, Stage[TrainOutputs]]] = [("stage1", s1)]

    if method in ("tract", "real"):
        # ---- generation: the stage-1 model writes a CoT for every training prompt ---------------------------
        gen: Stage[GenerateOutputs] = Stage(
            "generate", (s1,),
            key=lambda f: ("generate", f.fp(s1), hashed_section(cfg, "generation"), hashed_section(cfg, "data")),
            run=lambda f, fp: _generate(cfg, f.out(s1).model, pdir / f"generate-{fp[:8]}", ctx, fp),
            outputs=GenerateOutputs)
        # ---- stage-2 dataset: the self-generated CoTs with the gold scores ---------------------------------
        s2_path = pdir / "stage2.jsonl"
        build: Stage[Stage2DataOutputs] = Stage(
            "build_stage2", (gen,),
            key=lambda f: ("stage2_data", f.fp(gen), *selection_key(cfg)),
            run=lambda f, fp: _build_stage2(cfg, f.out(s1).model, pdir / f"generate-{f.fp(gen)[:8]}", s2_path, ctx),
            outputs=Stage2DataOutputs)
        # ---- stage 2: CoT-RAFT from the *seed* model on the self-generated CoTs -----------------------------
        s2_cfg = stage_config(cfg, pdir, train_path=str(s2_path), train_format="jsonl", stage="stage2")
        s2: Stage[TrainOutputs] = Stage(
            "train_stage2", (build,),
            key=lambda f: ("train", fingerprint(s2_cfg), f.fp(build)),
            run=lambda f, fp: _train(s2_cfg, f"{name}-stage2-{fp[:8]}", ctx, "stage2"),
            outputs=TrainOutputs)
        stages += [gen, build, s2]
        evaluated = evaluated[:1] if cfg.pipeline.evaluate_stage1 else []
        evaluated.append(("stage2", s2))
        if method == "real":
            return _real_stages(cfg, pdir, name, ctx, s2, stages, evaluated)

    # ---- evaluation: every trained model on every benchmark, in the method's inference modes ----------------
    for mstage, model in evaluated:
        for bench in cfg.evaluation.benchmarks:
            for mode in EVAL_MODES[method]:
                stages.append(_evaluation(cfg, pdir, ctx, mstage, model, bench, mode))
    return stages


def _real_stages(cfg: Config, pdir: Path, name: str, ctx: _Context, init: "Stage[TrainOutputs] | None",
                 stages: list[Stage[Any]], evaluated: list[tuple[str, Stage[TrainOutputs]]] | None = None
                 ) -> list[Stage[Any]]:
    """``train_real`` from ``init`` (TRACT's stage 2) or from ``pipeline.real_init``, then the evaluations."""
    from tract_dist.pipeline_checks import check_real_init

    evaluated = list(evaluated or [])
    if init is None:
        given = check_real_init(cfg)
        init = Stage("real_init", (), key=lambda f: ("real_init", content_fingerprint(given)),
                     run=lambda f, fp: TrainOutputs(model=str(given), run_dir="", summary=f"given {given}"),
                     outputs=TrainOutputs)
        stages = [init]
    src = init
    r_cfg = stage_config(cfg, pdir, stage="real")
    real: Stage[TrainOutputs] = Stage(
        "train_real", (src,),
        key=lambda f: ("train_real", fingerprint(r_cfg), hashed_section(cfg, "real"), data_fp_of(cfg), f.fp(src)),
        run=lambda f, fp: _train_real(r_cfg, f.out(src).model, f"{name}-real-{fp[:8]}", ctx),
        outputs=TrainOutputs)
    stages.append(real)
    evaluated.append(("real", real))
    for mstage, model in evaluated:
        for bench in cfg.evaluation.benchmarks:
            for mode in EVAL_MODES["real"]:
                stages.append(_evaluation(cfg, pdir, ctx, mstage, model, bench, mode))
    return stages


def data_fp_of(cfg: Config) -> str:
    return file_fingerprint(cfg.data.train_path or "")


def _train_real(cfg: Config, init_model: str, run_name: str, ctx: _Context) -> TrainOutputs:
    from tract_dist.real.stage import run_real
    from tract_dist.runtime.backend import release_engine

    release_engine()
    pipeline = ctx.tags.get("pipeline")
    r = run_real(cfg, init_model, run_name=run_name, parent=ctx.parent, address=ctx.address,
                 launcher=cfg.cluster.launcher, fresh=ctx.fresh, display_name="real-train",
                 model_name=f"real-{pipeline}" if pipeline else run_name)
    if r.mlflow_run_id:
        set_tags(RunHandle(r.tracking_uri, r.mlflow_run_id), {**ctx.tags, "model_stage": "real"})
    model = str(r.export_dir / "model")
    if not (r.export_dir / "model").is_dir() and (r.export_dir / "adapter").is_dir():
        model = str(r.export_dir / "adapter")
    final = {}
    result = Path(r.run_dir) / "train_result.json"
    if result.exists():
        final = json.loads(result.read_text(encoding="utf-8")).get("final_metrics", {})
    summary = f"{cfg.real.steps} rounds" + (f", reward {final['reward_mean']:.3f}" if "reward_mean" in final else "")
    return TrainOutputs(model=model, run_dir=str(r.run_dir), mlflow_run_id=r.mlflow_run_id, summary=summary,
                        mlflow_model_id=r.mlflow_model_id)


def _evaluation_settings(cfg: Config) -> dict[str, Any]:
    """``cfg.evaluation`` as its stages hash it: an unset ``rail_normalize`` (follow the export's record) is hashed
    as the value the pipeline's own exports record, ``loss.rail_normalize``, which is what it was spelled as when
    the key defaulted to false, so pipeline folders made before the key could be unset keep their evaluations.
    (A ``pipeline.stage1_export`` model's own record is covered by that stage's content fingerprint.)"""
    d = hashed_section(cfg, "evaluation")
    if d.get("num_cots") != "auto":  # the adaptive count's settings change nothing for a fixed count
        d.pop("cot_se_target", None)
        d.pop("max_cots", None)
    if d.get("rail_normalize") is None:
        d["rail_normalize"] = cfg.loss.rail_normalize
    if cfg.data.enable_thinking:  # judged prompts change; hashed only when on, so earlier evaluations stay valid
        d["enable_thinking"] = True
    return d


def _evaluation(cfg: Config, pdir: Path, ctx: _Context, mstage: str, model: Stage[TrainOutputs], bench: Any,
                mode: str) -> Stage[EvalOutputs]:
    out = pdir / "evaluate" / f"{mstage}-{bench.name}-{mode}"
    tags = {"model_stage": mstage, "benchmark": bench.name, "inference": mode}
    return Stage(
        f"evaluate_{mstage}_{bench.name}_{mode}", (model,),
        key=lambda f: ("evaluate", f.fp(model), bench.model_dump(), mode, _evaluation_settings(cfg),
                       hashed_section(cfg, "generation"), file_fingerprint(bench.path)),
        run=lambda f, fp: _evaluate(cfg, f.out(model).model, bench, mode, out, ctx.parent, {**ctx.tags, **tags}),
        outputs=EvalOutputs)


# ---- running the list -------------------------------------------------------------------------------------

def pipeline_dir(cfg: Config, name: str | None = None) -> tuple[str, Path]:
    """The pipeline's name (default ``pipeline-<method>-<config fingerprint>``) and folder."""
    name = name or f"pipeline-{cfg.pipeline.method}-{fingerprint(cfg)}"
    return name, Path(cfg.pipeline.output_dir).resolve() / name


def _selector(cfg: Config, stages: list[Stage[Any]]) -> Callable[[str], bool]:
    """``pipeline.stages`` as a predicate; a pattern that matches no stage is a ConfigError listing them."""
    wanted = cfg.pipeline.stages
    if wanted is None:
        return lambda _name: True
    names = [s.name for s in stages]
    for pat in wanted:
        if not fnmatch.filter(names, pat):
            raise ConfigError(f"pipeline.stages: '{pat}' matches no stage of this pipeline ({', '.join(names)})")
    return lambda n: any(fnmatch.fnmatchcase(n, pat) for pat in wanted)


@dataclass(frozen=True)
class StagePlan:
    """``status``: ``up to date``, ``to run``, ``not selected`` (outside ``pipeline.stages``) or ``waiting`` (an
    input is neither up to date nor selected); ``fingerprint``: None while waiting."""

    status: str
    fingerprint: str | None


def _walk(stages: list[Stage[Any]], state: "_State", selected: Callable[[str], bool], summary: PipelineSummary,
          *, dry: bool = False) -> tuple[Finished, dict[str, StagePlan]]:
    """Skip what is up to date, run what is selected; ``dry``: only say what would happen (stage -> status;
    a stage's fingerprint needs only its inputs' fingerprints, so a dry walk knows every one it would run)."""
    finished = Finished()
    status: dict[str, str] = {}
    fps: dict[str, str] = {}
    for st in stages:
        waiting = [i.name for i in st.inputs if i not in finished]
        if waiting:
            if selected(st.name) and not dry:
                raise ConfigError(f"pipeline.stages: stage {st.name} needs {', '.join(waiting)}, which has not run "
                                  "with these settings; select it too, or run it first")
            status[st.name] = "waiting"
            continue
        fp = fps[st.name] = _hash(*st.key(finished))
        rec = state.done(st.name, fp)
        if rec is not None:
            status[st.name] = "up to date"
            finished.add(st, fp, state.outputs(st, rec))
            if not dry:
                print(f"[pipeline] {st.name}: up to date, skipped", flush=True)
                summary.stages[st.name] = {**rec, "status": "skipped"}
            continue
        if not selected(st.name):
            status[st.name] = "not selected"
            continue
        if dry:
            status[st.name] = "to run"
            finished.add(st, fp, None)
            continue
        print(f"[pipeline] {st.name}: running", flush=True)
        t0 = time.monotonic()
        try:
            out = st.run(finished, fp)
        except BaseException as e:
            console.stage_failed(st.name, time.monotonic() - t0, e, state.path.parent / "logs")
            raise
        console.stage_done(st.name, time.monotonic() - t0, out.paths())
        summary.stages[st.name] = {**state.record(st.name, fp, out.record(), out.paths()), "status": "ran"}
        finished.add(st, fp, out)
        status[st.name] = "ran"
    return finished, {k: StagePlan(v, fps.get(k)) for k, v in status.items()}


class _State:
    """``state.json``: the parent run id and one record per finished stage (atomic rewrite, fsutil)."""

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


def plan_pipeline(cfg: Config, *, name: str | None = None) -> dict[str, StagePlan]:
    """What a run of ``cfg`` would do, stage by stage in order, without running or locking anything."""
    preflight(cfg)
    name, pdir = pipeline_dir(cfg, name)
    stages = build_stages(cfg, pdir, name)
    state = _State(pdir / "state.json")
    return _walk(stages, state, _selector(cfg, stages), PipelineSummary(name, pdir, cfg.pipeline.method), dry=True)[1]


def run_pipeline(cfg: Config, *, config_path: str | None = None, address: str | None = None,
                 name: str | None = None, fresh: bool = False) -> PipelineSummary:
    """Run (or resume) the pipeline configured by ``cfg``; returns what each stage did.

    A second invocation of the same pipeline while one runs fails at once, naming the holder (pid, host)."""
    preflight(cfg)
    check_data_files(cfg)
    check_stage1_export(cfg)
    name, pdir = pipeline_dir(cfg, name)
    with exclusive_lock(pdir, "pipeline"), console.quiet_run(pdir / "logs"):  # chatter to pdir/logs (console.py)
        return _run_locked(cfg, name, pdir, config_path=config_path, address=address, fresh=fresh)


def _run_locked(cfg: Config, name: str, pdir: Path, *, config_path: str | None, address: str | None,
                fresh: bool) -> PipelineSummary:
    from tract_dist.runtime.ray_cluster import init_ray_from_config

    method = cfg.pipeline.method
    pdir.mkdir(parents=True, exist_ok=True)
    state = _State(pdir / "state.json")
    summary = PipelineSummary(name, pdir, method)
    ctx = _Context(address=address, fresh=fresh)
    stages = build_stages(cfg, pdir, name, ctx)
    selected = _selector(cfg, stages)
    _check_selection(stages, _walk(stages, state, selected, summary, dry=True)[1], selected)
    if cfg.cluster.address or address or os.environ.get("RAY_ADDRESS") or _needs_ray(cfg):
        init_ray_from_config(cfg, address)
        from tract_dist.runtime.storage_check import check_shared_storage

        # Before any stage: on several nodes every folder a stage hands data through must be shared.
        check_shared_storage({"cluster.storage_path": pipeline_storage(cfg, pdir), "pipeline.output_dir": str(pdir)})

    tr = cfg.tracking
    model_tag = cfg.model.name_or_path
    with start_run(tr.tracking_uri, tr.experiment, name, enabled=tr.enabled, run_id=state.data.get("parent_run_id"),
                   tags={"stage": "pipeline", "method": method, "model": model_tag}) as parent:
        if parent.run_id and parent.run_id != state.data.get("parent_run_id"):  # new, or the old one was deleted
            state.data["parent_run_id"] = parent.run_id
            state.save()
            log_params(parent, {**cfg.flat(), "pipeline.name": name})
            if config_path:
                log_artifact(parent, config_path, "config")
        summary.parent_run_id = parent.run_id
        summary.tracking_uri, summary.experiment_id = parent.tracking_uri, parent.experiment_id
        ctx.parent = parent
        ctx.tags.update(method=method, model=model_tag, pipeline=name)
        finished, _ = _walk(stages, state, selected, summary)
        _roll_up(cfg, pdir, parent)
        results = {st.name: finished.out(st).record() for st in stages
                   if st.outputs is EvalOutputs and st in finished}
        atomic_write_json(pdir / "results.json", results)
        log_artifact(parent, pdir / "results.json", "pipeline")
        log_artifact(parent, state.path, "pipeline")
    return summary


def _roll_up(cfg: Config, pdir: Path, parent: RunHandle) -> None:
    """The stages' headline results, datasets and charts onto the pipeline's run (tracking.rollup), with the
    settings that tell methods apart as the method's stages ran them (ce_cot: lambda 0, CE on the score)."""
    from tract_dist.tracking.rollup import roll_up

    run_cfg = stage_config(cfg, pdir)
    roll_up(parent, {"method": cfg.pipeline.method, "model": cfg.model.name_or_path, "lam": run_cfg.loss.lam,
                     "ce_on_score_token": run_cfg.loss.ce_on_score_token, "use_cot": run_cfg.data.use_cot})


def _check_selection(stages: list[Stage[Any]], plan: dict[str, StagePlan], selected: Callable[[str], bool]) -> None:
    """Before anything runs: every selected stage's inputs are up to date or selected too."""
    for st in stages:
        if selected(st.name) and plan[st.name].status == "waiting":
            missing = [i.name for i in st.inputs if plan[i.name].status in ("waiting", "not selected")]
            raise ConfigError(f"pipeline.stages: stage {st.name} needs {', '.join(missing)}, which has not run with "
                              "these settings; select it too, or run it first")


def _needs_ray(cfg: Config) -> bool:
    """Ray is started only when a stage uses it (the GPU check machines have none)."""
    return cfg.cluster.launcher == "ray" or cfg.generation.ray or cfg.evaluation.ray


# ---- the stages' bodies ---------------------------------------------------------------------------------------

def _train(cfg: Config, run_name: str, ctx: _Context, model_stage: str) -> TrainOutputs:
    from tract_dist.runtime.backend import release_engine
    from tract_dist.train.trainer import run_training

    release_engine()  # an in-process inference engine kept from an earlier stage must not hold memory training needs
    # Folders keep their fingerprinted names; MLflow shows short distinct ones: the run "stage1-train" under the
    # pipeline's run, its export the logged model "stage1-<pipeline>" (the stage first: the UI cuts long names).
    pipeline = ctx.tags.get("pipeline")
    r = run_training(cfg, run_name=run_name, parent=ctx.parent, address=ctx.address, stage="train",
                     launcher=cfg.cluster.launcher, fresh=ctx.fresh, display_name=f"{model_stage}-train",
                     model_name=f"{model_stage}-{pipeline}" if pipeline else run_name)
    if r.mlflow_run_id:
        set_tags(RunHandle(r.tracking_uri, r.mlflow_run_id), {**ctx.tags, "model_stage": model_stage})
    model = str(r.export_dir / "model")
    if not (r.export_dir / "model").is_dir() and (r.export_dir / "adapter").is_dir():
        model = str(r.export_dir / "adapter")  # LoRA without merge_on_export: served unmerged by both backends
    if r.export_uri:  # on a URI storage root: the published copy, which every node's replicas fetch and check
        from tract_dist.storage import join

        model = join(r.export_uri, Path(model).name)
    return TrainOutputs(model=model, run_dir=str(r.run_dir), mlflow_run_id=r.mlflow_run_id,
                        summary=f"{r.data_summary['encode_encoded']} examples", mlflow_model_id=r.mlflow_model_id)


def _generate(cfg: Config, model: str, out: Path, ctx: _Context, fp: str) -> GenerateOutputs:
    from tract_dist.generate.pipeline import generate_cots

    named = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": "stage1-generate"})})
    s = generate_cots(named, model, out, parent_run=ctx.parent, fingerprint=fp, fresh=ctx.fresh)
    if s.get("missing"):
        raise RuntimeError(f"generation left {s['missing']} CoTs missing in {out}; rerun the pipeline to resume")
    return GenerateOutputs(dir=str(out), ok=s.get("ok"), failed=s.get("failed"),
                           summary=f"{s.get('ok')} CoTs, {s.get('failed')} failed")


def _build_stage2(cfg: Config, stage1_model: str, gen_dir: Path, out: Path, ctx: _Context) -> Stage2DataOutputs:
    """The stage-2 JSONL from the generated CoTs under ``generation.select``; the selection's counts go to the
    console, this stage's MLflow run and (returned) state.json."""
    from tract_dist.data.score_tokens import parse_scale
    from tract_dist.generate.pipeline import judge_rail_normalize, load_training_examples
    from tract_dist.generate.select import SelectionSpec, summary_line
    from tract_dist.generate.stage2 import build_stage2_dataset
    from tract_dist.tracking import log_metrics

    lo, hi = parse_scale(cfg.data.scale)
    spec = SelectionSpec.from_config(cfg.generation)
    t = cfg.tracking
    with start_run(t.tracking_uri, t.experiment, "stage2-data", enabled=t.enabled, parent=ctx.parent,
                   tags={**ctx.tags, "stage": "build_stage2"}) as run:
        log_params(run, {f"select.{k}": v for k, v in spec.as_dict().items()} | {"num_cots": cfg.generation.num_cots})
        stats = build_stage2_dataset(gen_dir, load_training_examples(cfg), out, spec,
                                     score_values=list(range(lo, hi + 1)),
                                     rail_normalize=judge_rail_normalize(cfg, stage1_model))
        sel = stats["selection"]
        log_metrics(run, {f"select.{k}": float(v) for k, v in sel.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool)} | {"written": float(stats["written"])})
    console.line(f"[stage2] {summary_line(sel)}")
    return Stage2DataOutputs.from_record(  # type: ignore[return-value]
        {**stats, "path": str(out), "summary": f"{stats.get('written', '?')} examples"})


def _evaluate(cfg: Config, model: str, bench: Any, mode: str, out: Path, parent: RunHandle | None,
              tags: dict[str, str]) -> EvalOutputs:
    from tract_dist.evaluate.runner import evaluate_model

    d = cfg.model_dump()
    d["evaluation"].update(benchmarks=[bench.model_dump()], mode=mode, output_dir=str(out))
    # Short and distinct in the runs table: eval-stage2-vicuna (the inference mode only when the method
    # evaluates in more than one, as ce_cot does).
    several = len(EVAL_MODES[cfg.pipeline.method]) > 1
    d["tracking"]["run_name"] = f"eval-{tags['model_stage']}-{bench.name}" + (f"-{mode}" if several else "")
    ecfg = Config.model_validate(d)
    res = evaluate_model(ecfg, model, out, parent_run=parent, tags=tags)
    metrics = res[bench.name]
    overall = metrics["overall"]
    summary = " ".join(f"{k}={overall[k]:.3f}" for k in ("pearson", "spearman", "kendall", "rmse")
                       if overall.get(k) is not None)
    if cfg.evaluation.num_cots == "auto" and overall.get("cots_mean") is not None:
        summary += f" cots_mean={overall['cots_mean']:.2f}"
    return EvalOutputs(metrics=metrics, summary=f"{summary} (n={overall.get('n')}, failed={overall.get('failed')})",
                       dir=str(out))
