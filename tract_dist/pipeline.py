"""The TRACT pipeline in stage order: stage-1 training -> CoT generation -> stage-2 dataset -> stage-2
training (from the seed model) -> CoT-RAIL evaluation of both stages.

Each stage records a fingerprint of its own settings and of its inputs (upstream fingerprints, data files) in
``state.json``; a rerun skips every stage whose fingerprint and outputs are unchanged and resumes an
interrupted one through the stage's own mechanism (Ray Train checkpoints, missing generation shards). The
training runs and the generation folder are named after their stage fingerprint, so a rerun after a config
change starts those stages in new folders and can never resume another configuration's checkpoint or mix its
CoTs. One invocation per pipeline at a time (a lock beside its folder). One MLflow parent run per pipeline,
a child run per stage and per benchmark.

Methods (``pipeline.method``) make the paper's baselines one override away:
``tract`` (two stages), ``cot_raft`` (stage 1 only), ``ce_cot`` (CE only, lambda = 0 with CE on the score
token; evaluated by decoding and by CoT-RAIL), ``raft`` (score-only targets without CoT; RAIL inference).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tract_dist.config import Config, ConfigError
from tract_dist.fsutil import CorruptStateError, atomic_write_json, exclusive_lock, file_fingerprint
from tract_dist.tracking import RunHandle, log_artifact, log_params, set_tags, start_run

EVAL_MODES = {"tract": ["cot_rail"], "cot_raft": ["cot_rail"], "ce_cot": ["decode", "cot_rail"], "raft": ["rail"]}


@dataclass
class PipelineSummary:
    name: str
    directory: Path
    method: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_run_id: str | None = None

    def render(self) -> str:
        lines = [f"[pipeline] {self.name} ({self.method}) in {self.directory}"]
        for name, rec in self.stages.items():
            status = rec.get("status", "?")
            lines.append(f"  {name:<32} {status:<8} {rec.get('outputs', {}).get('summary', '')}")
        if self.parent_run_id:
            lines.append(f"  MLflow parent run: {self.parent_run_id}")
        return "\n".join(lines)


def check_data_files(cfg: Config) -> dict[str, str]:
    """The local data files the pipeline reads (training set, every benchmark), each checked to exist now.

    A missing benchmark would otherwise surface only after both training stages; relative paths resolve
    against the working directory, which the message names. ``hf:`` sources are left to the readers.
    Returns {config key: absolute path}."""
    wanted = {"data.train_path": cfg.data.train_path}
    wanted.update({f"evaluation.benchmarks[{i}].path": b.path for i, b in enumerate(cfg.evaluation.benchmarks)})
    found: dict[str, str] = {}
    for key, path in wanted.items():
        if not path or path.startswith("hf:"):
            continue
        p = Path(path)
        if not p.is_file():
            where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            what = "is not a file" if p.exists() else "does not exist"
            raise ConfigError(f"{key}: '{path}' {what}{where}")
        found[key] = str(p.resolve())
    return found


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
    d["cluster"]["storage_path"] = str(pdir / "ray")
    d["tracking"]["run_name"] = None
    return Config.model_validate(d)


class _State:
    """``state.json``: the parent run id and one record per finished stage (atomic rewrite)."""

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

    def record(self, name: str, fp: str, outputs: dict[str, Any], paths: list[str]) -> dict[str, Any]:
        rec = {"fingerprint": fp, "outputs": outputs, "paths": paths, "finished_at": time.time()}
        self.data["stages"][name] = rec
        self.save()
        return rec


def run_pipeline(cfg: Config, *, config_path: str | None = None, address: str | None = None,
                 name: str | None = None, fresh: bool = False) -> PipelineSummary:
    """Run (or resume) the pipeline configured by ``cfg``; returns what each stage did.

    A second invocation of the same pipeline while one runs fails at once, naming the holder (pid, host)."""
    from tract_dist.train.trainer import fingerprint, preflight

    method = cfg.pipeline.method
    preflight(cfg)
    check_data_files(cfg)
    name = name or f"pipeline-{method}-{fingerprint(cfg)}"
    pdir = Path(cfg.pipeline.output_dir).resolve() / name
    with exclusive_lock(pdir, "pipeline"):
        return _run_locked(cfg, name, pdir, config_path=config_path, address=address, fresh=fresh)


def _run_locked(cfg: Config, name: str, pdir: Path, *, config_path: str | None, address: str | None,
                fresh: bool) -> PipelineSummary:
    from tract_dist.train.trainer import fingerprint, ray_init

    method = cfg.pipeline.method
    pdir.mkdir(parents=True, exist_ok=True)
    state = _State(pdir / "state.json")
    summary = PipelineSummary(name, pdir, method)
    if cfg.cluster.address or address or os.environ.get("RAY_ADDRESS") or _needs_ray(cfg):
        ray_init(cfg, address)

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
        tags = {"method": method, "model": model_tag, "pipeline": name}

        def stage(sname: str, fp: str, body: Callable[[], tuple[dict[str, Any], list[str]]]) -> dict[str, Any]:
            rec = state.done(sname, fp)
            if rec is not None:
                print(f"[pipeline] {sname}: up to date, skipped", flush=True)
                summary.stages[sname] = {**rec, "status": "skipped"}
                return rec["outputs"]
            print(f"[pipeline] {sname}: running", flush=True)
            outputs, paths = body()
            summary.stages[sname] = {**state.record(sname, fp, outputs, paths), "status": "ran"}
            return outputs

        data_fp = file_fingerprint(cfg.data.train_path or "")
        seed_models: dict[str, tuple[str, str]] = {}  # stage -> (model dir, fingerprint)

        # ---- stage 1: CoT-RAFT from the seed model on annotated CoTs -----------------------------------
        s1_cfg = stage_config(cfg, pdir, stage="stage1")
        s1_fp = _hash("train", fingerprint(s1_cfg), data_fp)
        s1 = stage("train_stage1", s1_fp, lambda: _train(s1_cfg, f"{name}-stage1-{s1_fp[:8]}", parent, tags,
                                                         address, fresh))
        seed_models["stage1"] = (s1["model"], s1_fp)

        if method == "tract":
            # ---- generation: the stage-1 model writes a CoT for every training prompt ------------------
            gen_fp = _hash("generate", s1_fp, cfg.generation.model_dump(), cfg.data.model_dump())
            gen_dir = pdir / f"generate-{gen_fp[:8]}"
            stage("generate", gen_fp, lambda: _generate(cfg, s1["model"], gen_dir, parent, gen_fp, fresh))
            s2_path = pdir / "stage2.jsonl"
            s2d_fp = _hash("stage2_data", gen_fp)
            stage("build_stage2", s2d_fp, lambda: _build_stage2(cfg, gen_dir, s2_path))
            # ---- stage 2: CoT-RAFT from the *seed* model on the self-generated CoTs --------------------
            s2_cfg = stage_config(cfg, pdir, train_path=str(s2_path), train_format="jsonl", stage="stage2")
            s2_fp = _hash("train", fingerprint(s2_cfg), s2d_fp)
            s2 = stage("train_stage2", s2_fp, lambda: _train(s2_cfg, f"{name}-stage2-{s2_fp[:8]}", parent, tags,
                                                             address, fresh))
            seed_models["stage2"] = (s2["model"], s2_fp)
            if not cfg.pipeline.evaluate_stage1:
                seed_models.pop("stage1")

        # ---- evaluation: every trained model on every benchmark, in the method's inference modes -------
        results: dict[str, Any] = {}
        for mstage, (model_dir, mfp) in seed_models.items():
            for bench in cfg.evaluation.benchmarks:
                for mode in EVAL_MODES[method]:
                    ename = f"evaluate_{mstage}_{bench.name}_{mode}"
                    efp = _hash("evaluate", mfp, bench.model_dump(), mode, cfg.evaluation.model_dump(),
                                cfg.generation.model_dump(), file_fingerprint(bench.path))
                    results[ename] = stage(ename, efp, lambda m=model_dir, b=bench, mo=mode, st=mstage: _evaluate(
                        cfg, m, b, mo, pdir / "evaluate" / f"{st}-{b.name}-{mo}", parent,
                        {**tags, "model_stage": st, "benchmark": b.name, "inference": mo}))
        atomic_write_json(pdir / "results.json", results)
        log_artifact(parent, pdir / "results.json", "pipeline")
        log_artifact(parent, state.path, "pipeline")
    return summary


def _needs_ray(cfg: Config) -> bool:
    """Ray is started only when a stage uses it (the GPU check machines have none)."""
    return cfg.cluster.launcher == "ray" or cfg.generation.ray or cfg.evaluation.ray


def _train(cfg: Config, run_name: str, parent: RunHandle, tags: dict[str, str],
           address: str | None, fresh: bool = False) -> tuple[dict[str, Any], list[str]]:
    from tract_dist.runtime.backend import release_engine
    from tract_dist.train.trainer import run_training

    release_engine()  # an in-process inference engine kept from an earlier stage must not hold memory training needs
    r = run_training(cfg, run_name=run_name, parent=parent, address=address, stage="train",
                     launcher=cfg.cluster.launcher, fresh=fresh)
    if r.mlflow_run_id:
        set_tags(RunHandle(r.tracking_uri, r.mlflow_run_id), tags)
    model = str(r.export_dir / "model")
    if not (r.export_dir / "model").is_dir() and (r.export_dir / "adapter").is_dir():
        model = str(r.export_dir / "adapter")  # LoRA without merge_on_export: served unmerged by both backends
    return {"model": model, "run_dir": str(r.run_dir), "mlflow_run_id": r.mlflow_run_id,
            "summary": f"{r.data_summary['encode_encoded']} examples"}, [model]


def _generate(cfg: Config, model: str, out: Path, parent: RunHandle, fp: str,
              fresh: bool = False) -> tuple[dict[str, Any], list[str]]:
    from tract_dist.generate.pipeline import generate_cots

    s = generate_cots(cfg, model, out, parent_run=parent, fingerprint=fp, fresh=fresh)
    if s.get("missing"):
        raise RuntimeError(f"generation left {s['missing']} CoTs missing in {out}; rerun the pipeline to resume")
    return {"dir": str(out), "ok": s.get("ok"), "failed": s.get("failed"),
            "summary": f"{s.get('ok')} CoTs, {s.get('failed')} failed"}, [str(out / "summary.json")]


def _build_stage2(cfg: Config, gen_dir: Path, out: Path) -> tuple[dict[str, Any], list[str]]:
    from tract_dist.generate.stage2 import build_stage2_dataset
    from tract_dist.generate.pipeline import load_training_examples

    stats = build_stage2_dataset(gen_dir, load_training_examples(cfg), out)
    return {"path": str(out), **stats, "summary": f"{stats.get('written', '?')} examples"}, [str(out)]


def _evaluate(cfg: Config, model: str, bench: Any, mode: str, out: Path, parent: RunHandle,
              tags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    from tract_dist.evaluate.runner import evaluate_model

    d = cfg.model_dump()
    d["evaluation"].update(benchmarks=[bench.model_dump()], mode=mode, output_dir=str(out))
    d["tracking"]["run_name"] = f"eval-{tags['model_stage']}-{bench.name}-{mode}"
    ecfg = Config.model_validate(d)
    res = evaluate_model(ecfg, model, out, parent_run=parent, tags=tags)
    metrics = res[bench.name]
    overall = metrics["overall"]
    summary = " ".join(f"{k}={overall[k]:.3f}" for k in ("pearson", "spearman", "kendall", "rmse")
                       if overall.get(k) is not None)
    return {"metrics": metrics, "summary": f"{summary} (n={overall.get('n')}, failed={overall.get('failed')})"}, \
        [str(out)]
