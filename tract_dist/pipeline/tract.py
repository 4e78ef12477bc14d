"""The TRACT pipeline as an ordered list of stages: stage-1 training -> CoT generation -> stage-2 dataset ->
stage-2 training (from the seed model) -> CoT-RAIL evaluation of both stages (:func:`build_stages`), with what
each stage hashes, runs and returns (the engine that walks them: :mod:`tract_dist.pipeline.engine`).

The training runs and the generation folder are named after their stage fingerprint, so a rerun after a config
change starts those stages in new folders and can never resume another configuration's checkpoint or mix its
CoTs; an interrupted stage resumes through its own mechanism (Ray Train checkpoints, missing generation shards).

Methods (``pipeline.method``, :mod:`tract_dist.pipeline.methods`) make the paper's baselines one override away:
``tract`` (two stages), ``cot_raft`` (stage 1 only), ``ce_cot`` (CE only, lambda = 0 with CE on the score
token; evaluated by decoding and by CoT-RAIL), ``raft`` (score-only targets without CoT; RAIL inference).
``real`` (TRACT's stages, then ``train_real``, REAL's RL stage, from the stage-2 export; or from
``pipeline.real_init``, any export, without TRACT's stages).
``pipeline.stage1_export`` starts from a finished stage-1 model instead of training one; ``pipeline.stages``
runs a subset (one stage per process, say), using the others' recorded outputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tract_dist.console import TERMINAL
from tract_dist.config import Config, ConfigError
from tract_dist.identity import content_fingerprint, file_fingerprint, fingerprint, hashed_section, selection_key
from tract_dist.pipeline.engine import Stage, StageOutputs
from tract_dist.pipeline.inputs import check_real_init, check_stage1_export
from tract_dist.pipeline.methods import EVAL_MODES
from tract_dist.tracking import RunHandle, log_params, set_tags, start_run

log = logging.getLogger(__name__)


# ---- what each stage returns (recorded in state.json as a plain mapping) --------------------------------------

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


def stage_config(cfg: Config, pdir: Path, *, train_path: str | None = None, train_format: str | None = None,
                 stage: str = "stage1") -> Config:
    """The config a training stage runs with: the method's loss/data switches, outputs under ``pdir``."""
    method = cfg.pipeline.method
    loss = {"lam": 0.0, "ce_on_score_token": True} if method == "ce_cot" else {}
    data: dict[str, Any] = {"use_cot": False} if method == "raft" else {}
    if train_path is not None:
        data.update(train_path=train_path, train_format=train_format, max_examples=None, skip_invalid=False)
    return cfg.derive(loss=loss, data=data, training={"output_dir": str(pdir)},
                      cluster={"storage_path": pipeline_storage(cfg, pdir)}, tracking={"run_name": None})


def pipeline_storage(cfg: Config, pdir: Path) -> str:
    """Ray Train's storage for the pipeline's runs: ``<pipeline>/ray`` on one machine (the default
    ``cluster.storage_path``), else ``<cluster.storage_path>/<pipeline name>`` (a URI or a shared mount)."""
    from tract_dist.storage import join

    sp = cfg.cluster.storage_path
    default = type(cfg.cluster).model_fields["storage_path"].default
    return str(pdir / "ray") if sp == default else join(sp, pdir.name)


@dataclass
class StageContext:
    """What every stage's run shares: the parent MLflow run, its tags, the Ray address, ``--fresh``."""

    parent: RunHandle | None = None
    tags: dict[str, str] = field(default_factory=dict)
    address: str | None = None
    fresh: bool = False


# ---- the pipeline, top to bottom ----------------------------------------------------------------------------

def build_stages(cfg: Config, pdir: Path, name: str, ctx: StageContext | None = None) -> list[Stage[Any]]:
    """The stages of ``cfg``'s method in the order they run. Their names and fingerprints are those of every
    pipeline folder made so far (state.json keys; run and generation folders are named after them)."""
    ctx = ctx or StageContext()
    method = cfg.pipeline.method
    if cfg.data.task == "relative" and method in ("tract", "real"):  # generation writes absolute-grading CoTs
        raise ConfigError(f"pipeline.method: {method} generates stage-2 CoTs, which are absolute-grading only so "
                          "far; with data.task relative use cot_raft, ce_cot or raft")
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
            run=lambda f, fp: _generate(cfg, f.out(s1).model, pdir / f"generate-{fp[:8]}", ctx, fp,
                                        _mirror(cfg, pdir, f"generate-{fp[:8]}")),
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


def _real_stages(cfg: Config, pdir: Path, name: str, ctx: StageContext, init: "Stage[TrainOutputs] | None",
                 stages: list[Stage[Any]], evaluated: list[tuple[str, Stage[TrainOutputs]]] | None = None
                 ) -> list[Stage[Any]]:
    """``train_real`` from ``init`` (TRACT's stage 2) or from ``pipeline.real_init``, then the evaluations."""
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


def _train_real(cfg: Config, init_model: str, run_name: str, ctx: StageContext) -> TrainOutputs:
    from tract_dist.real.stage import run_real
    from tract_dist.runtime.backend import release_engine

    release_engine()
    pipeline = ctx.tags.get("pipeline")
    r = run_real(cfg, init_model, run_name=run_name, parent=ctx.parent, address=ctx.address,
                 launcher=cfg.cluster.launcher, fresh=ctx.fresh, display_name="real-train",
                 model_name=f"real-{pipeline}" if pipeline else run_name)
    model = _tagged_export(r, ctx, "real")
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


def _evaluation(cfg: Config, pdir: Path, ctx: StageContext, mstage: str, model: Stage[TrainOutputs], bench: Any,
                mode: str) -> Stage[EvalOutputs]:
    out = pdir / "evaluate" / f"{mstage}-{bench.name}-{mode}"
    tags = {"model_stage": mstage, "benchmark": bench.name, "inference": mode}
    return Stage(
        f"evaluate_{mstage}_{bench.name}_{mode}", (model,),
        key=lambda f: ("evaluate", f.fp(model), bench.model_dump(), mode, _evaluation_settings(cfg),
                       hashed_section(cfg, "generation"), file_fingerprint(bench.path)),
        run=lambda f, fp: _evaluate(cfg, f.out(model).model, bench, mode, out, ctx.parent, {**ctx.tags, **tags}),
        outputs=EvalOutputs)


# ---- the stages' bodies ---------------------------------------------------------------------------------------

def _train(cfg: Config, run_name: str, ctx: StageContext, model_stage: str) -> TrainOutputs:
    from tract_dist.runtime.backend import release_engine
    from tract_dist.train.trainer import run_training

    release_engine()  # an in-process inference engine kept from an earlier stage must not hold memory training needs
    # Folders keep their fingerprinted names; MLflow shows short distinct ones: the run "stage1-train" under the
    # pipeline's run, its export the logged model "stage1-<pipeline>" (the stage first: the UI cuts long names).
    pipeline = ctx.tags.get("pipeline")
    r = run_training(cfg, run_name=run_name, parent=ctx.parent, address=ctx.address, stage="train",
                     launcher=cfg.cluster.launcher, fresh=ctx.fresh, display_name=f"{model_stage}-train",
                     model_name=f"{model_stage}-{pipeline}" if pipeline else run_name)
    model = _tagged_export(r, ctx, model_stage)
    if r.export_uri:  # on a URI storage root: the published copy, which every node's replicas fetch and check
        from tract_dist.storage import join

        model = join(r.export_uri, Path(model).name)
    return TrainOutputs(model=model, run_dir=str(r.run_dir), mlflow_run_id=r.mlflow_run_id,
                        summary=f"{r.data_summary['encode_encoded']} examples", mlflow_model_id=r.mlflow_model_id)


def _tagged_export(r: Any, ctx: StageContext, model_stage: str) -> str:
    """A finished training stage's run tagged with the pipeline's tags and its stage; its loadable export: the
    model, or the LoRA adapter without merge_on_export (served unmerged by both backends)."""
    if r.mlflow_run_id:
        set_tags(RunHandle(r.tracking_uri, r.mlflow_run_id), {**ctx.tags, "model_stage": model_stage})
    model = r.export_dir / "model"
    if not model.is_dir() and (r.export_dir / "adapter").is_dir():
        model = r.export_dir / "adapter"
    return str(model)


def _mirror(cfg: Config, pdir: Path, *parts: str) -> str | None:
    """A hand-over's copy on a URI ``cluster.storage_path``: ``<storage_path>/<pipeline>/<parts>`` (storage.py)."""
    from tract_dist.storage import mirror_of

    return mirror_of(pipeline_storage(cfg, pdir), *parts)


def _generate(cfg: Config, model: str, out: Path, ctx: StageContext, fp: str, mirror: str | None) -> GenerateOutputs:
    from tract_dist.generate.pipeline import GenerateSpec, generate_cots

    named = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_name": "stage1-generate"})})
    s = generate_cots(GenerateSpec.of(named), model, out, parent_run=ctx.parent, fingerprint=fp, fresh=ctx.fresh,
                      mirror=mirror)
    if s.get("missing"):
        raise RuntimeError(f"generation left {s['missing']} CoTs missing in {out}; rerun the pipeline to resume")
    return GenerateOutputs(dir=str(out), ok=s.get("ok"), failed=s.get("failed"),
                           summary=f"{s.get('ok')} CoTs, {s.get('failed')} failed")


def _build_stage2(cfg: Config, stage1_model: str, gen_dir: Path, out: Path, ctx: StageContext) -> Stage2DataOutputs:
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
        stats = build_stage2_dataset(gen_dir, load_training_examples(cfg.data), out, spec,
                                     score_values=list(range(lo, hi + 1)),
                                     rail_normalize=judge_rail_normalize(cfg.evaluation, stage1_model))
        sel = stats["selection"]
        log_metrics(run, {f"select.{k}": float(v) for k, v in sel.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool)} | {"written": float(stats["written"])})
    if (mirror := _mirror(cfg, out.parent, out.name)) is not None:
        from tract_dist.storage import put_file

        put_file(out, mirror)
    log.info(f"[stage2] {summary_line(sel)}", extra=TERMINAL)
    return Stage2DataOutputs.from_record(  # type: ignore[return-value]
        {**stats, "path": str(out), "summary": f"{stats.get('written', '?')} examples"})


def _evaluate(cfg: Config, model: str, bench: Any, mode: str, out: Path, parent: RunHandle | None,
              tags: dict[str, str]) -> EvalOutputs:
    from tract_dist.evaluate.runner import EvaluateSpec, evaluate_model

    # Short and distinct in the runs table: eval-stage2-vicuna (the inference mode only when the method
    # evaluates in more than one, as ce_cot does).
    several = len(EVAL_MODES[cfg.pipeline.method]) > 1
    run_name = f"eval-{tags['model_stage']}-{bench.name}" + (f"-{mode}" if several else "")
    ecfg = cfg.derive(evaluation={"benchmarks": [bench], "mode": mode, "output_dir": str(out)},
                      tracking={"run_name": run_name})
    res = evaluate_model(EvaluateSpec.of(ecfg), model, out, parent_run=parent, tags=tags,
                         mirror=_mirror(cfg, out.parent.parent, "evaluate", out.name))
    metrics = res[bench.name]
    overall = metrics["overall"]
    summary = " ".join(f"{k}={overall[k]:.3f}" for k in ("pearson", "spearman", "kendall", "rmse", "accuracy",
                                                         "position_agreement") if overall.get(k) is not None)
    if cfg.evaluation.num_cots == "auto" and overall.get("cots_mean") is not None:
        summary += f" cots_mean={overall['cots_mean']:.2f}"
    return EvalOutputs(metrics=metrics, summary=f"{summary} (n={overall.get('n')}, failed={overall.get('failed')})",
                       dir=str(out))
