"""CPU-scale quality benchmark: ce_cot vs raft vs cot_raft vs tract on the step-checking judge task.

Every (method, seed) cell trains from the seed model (SmolLM2-135M-Instruct by default) with the same examples,
steps, learning rate and seed, then is evaluated on the held-out set in the method's inference modes:

    ce_cot    CE only (lam = 0, CE on the score token)          -> cot_rail (+ decode, in the extras phase)
    raft      score-only target, no CoT                        -> rail
    cot_raft  CE over CoT + lam * (yhat - y*)^2, one stage     -> cot_rail
    tract     stage 1 = the cot_raft model of the same seed (identical config, data and seed, so the very same
              training run is reused), generation of one greedy CoT per training prompt by that model, stage 2
              = CoT-RAFT from the seed model on the self-generated CoTs with the gold scores -> cot_rail
    tract_<rule>  (``--select-rules``, #24) TRACT with gold-checked selection: the same stage 1, k CoTs per
              training prompt sampled at ``--select-temperature`` (``--select-k``, default 4), each read out by
              RAIL as it is written, ``generation.select=<rule>`` builds the stage-2 data, and stage 2 trains
              exactly as many optimizer steps as every other model (``training.max_steps``). The cells of one
              seed share one generation (the same CoTs, hard-linked), so rules compare on the same samples.

Each cell is a ``tract-dist pipeline`` folder (``cells/<method>-s<seed>``, the pipeline's ``pipeline.method``);
TRACT's is started from the cot_raft cell's export (``pipeline.stage1_export``). Each phase (train / generate +
stage-2 data / stage-2 training / evaluate) is one ``tract-dist pipeline`` invocation with ``pipeline.stages``
set to its stages, in its own process (DeepSpeed's process group and the model memory go away with it), with a
thread count chosen for the machine's load at its start (``cluster.threads_per_replica`` and OMP_NUM_THREADS).
A phase whose stages are up to date (``plan_pipeline``) is skipped, so rerunning the same command resumes where
it stopped. Cells run seed-major (all methods of seed 0, then seed 1, ...) so that a run cut short leaves
complete seeds; ce_cot's decode evaluation runs last. The report is report.py's.

    python benchmarks/quality/run_quality.py --work /tmp/tract-quality --seeds 0 1 2
    python benchmarks/quality/run_quality.py --work /tmp/tract-quality-ann --variant annotator \
        --select-rules weighted --seeds 0 1 2        # the paper's situation, with gold-checked selection
    python benchmarks/quality/run_quality.py --work /tmp/tract-quality --report-only   # re-aggregate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from report import (BENCH, EXTRA_MODES, METHODS, SELECT_PREFIX, SELECT_RULES, eval_dir, is_tract,  # noqa: E402
                    main_mode, model_stage, select_methods, trained_model, train_dir)
from report import write_report  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------

def settings_from_args(a: argparse.Namespace) -> dict[str, Any]:
    return {"model": a.model, "tokenizer": a.tokenizer, "dtype": a.dtype, "train_examples": a.train,
            "test_examples": a.test, "task_seed": a.task_seed, "task_variant": a.variant, "learning_rate": a.lr,
            "micro_batch_size": a.micro, "grad_accum": a.accum,
            "epochs": a.epochs, "lam": a.lam, "warmup_ratio": a.warmup, "lr_scheduler": "cosine",
            "max_new_tokens": a.max_new_tokens, "eval_batch_size": a.eval_batch, "gen_temperature": a.gen_temperature,
            "system_prompt": "Prometheus ABS_SYSTEM_PROMPT", "zero_stage": 0, "workers": 1,
            "launcher": "inline (one process per stage)", "max_length": 1024,
            # the selection cells' shared settings; which rules run is per invocation (cells tract_<rule>), so
            # a table grows rule by rule and seed by seed in one work dir
            "select": {"k": a.select_k, "temperature": a.select_temperature, "tolerance": a.select_tolerance,
                       "fallback": a.select_fallback, "steps": budget_steps(a.train, a.micro, a.accum, a.epochs)}}


def budget_steps(n_train: int, micro: int, accum: int, epochs: float) -> int:
    """Optimizer steps every model trains (the step plan's rule, one worker): a selection cell's stage 2 trains
    this many whatever number of CoTs it kept (up to k per prompt), so every row has the same budget."""
    return max(1, math.ceil(epochs * max(1, math.ceil(n_train / (micro * accum)))))


def cell_overrides(s: dict[str, Any], method: str, seed: int, train_path: str, test_path: str,
                   work: Path) -> list[str]:
    """The cell's pipeline config as overrides: the same examples, steps, learning rate and seed for every
    method; the method's loss/data switches are the pipeline's own (``pipeline.method``)."""
    bench = [{"name": BENCH, "path": test_path, "format": "jsonl"}]
    ov = [
        f"model.name_or_path={s['model']}", f"model.dtype={s.get('dtype', 'auto')}",
        f"evaluation.benchmarks={json.dumps(bench)}",
        f"data.train_path={train_path}", "data.train_format=jsonl", f"data.max_length={s['max_length']}",
        f"loss.lam={s['lam']}",
        f"training.learning_rate={s['learning_rate']}", f"training.micro_batch_size={s['micro_batch_size']}",
        f"training.gradient_accumulation_steps={s['grad_accum']}", f"training.epochs={s['epochs']}",
        f"training.warmup_ratio={s['warmup_ratio']}", "training.lr_scheduler=cosine", f"training.seed={seed}",
        "training.save_steps=100000", "training.zero_stage=0", "training.logging_steps=1",
        f"generation.max_new_tokens={s['max_new_tokens']}", f"generation.temperature={s['gen_temperature']}",
        f"generation.seed={seed}", "generation.ray=false", f"generation.batch_size={s['eval_batch_size']}",
        "generation.shard_size=1000",
        "evaluation.ray=false", f"evaluation.batch_size={s['eval_batch_size']}",
        "tracking.enabled=false", "cluster.num_workers=1", "cluster.launcher=inline",
        f"pipeline.method={'tract' if is_tract(method) else method}", f"pipeline.output_dir={work / 'cells'}",
    ]
    if s.get("tokenizer"):
        ov.append(f"model.tokenizer={s['tokenizer']}")
    if method.startswith(SELECT_PREFIX):  # gold-checked selection (#24): k sampled CoTs, one rule, same budget
        sel = s["select"]
        ov += [f"generation.num_cots={sel['k']}", f"generation.temperature={sel['temperature']}",
               f"generation.select={method[len(SELECT_PREFIX):]}", f"generation.select_tolerance={sel['tolerance']}",
               f"generation.select_fallback={sel['fallback']}", f"training.max_steps={sel['steps']}"]
    if is_tract(method):  # stage 1 is the cot_raft cell's model; its own evaluation is that cell's
        stage1 = trained_model(work / "cells" / f"cot_raft-s{seed}", "cot_raft")
        if stage1 is None:
            raise RuntimeError(f"{method}-s{seed} needs its stage 1 (cot_raft-s{seed}) first")
        ov += [f"pipeline.stage1_export={stage1}", "pipeline.evaluate_stage1=false"]
    return ov


def _config(overrides: list[str]) -> Any:
    from tract_dist.config import load_config

    return load_config(None, overrides)


# ---------------------------------------------------------------------------------------------------------
# load-aware thread count
# ---------------------------------------------------------------------------------------------------------

def others_busy_cores(seconds: float = 2.0) -> float:
    """CPU cores kept busy by other processes, sampled from /proc/stat while this driver sleeps."""
    def snap() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f) - idle, sum(f)
    b0, t0 = snap()
    time.sleep(seconds)
    b1, t1 = snap()
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


def choose_threads() -> int:
    """All cores when the machine is free; 1 thread when others keep a core busy: on a shared 2-core machine two
    OpenMP threads that are descheduled at every barrier run several times slower than one (measured under
    load: a 16 x 460-token prefill took 78 s with 2 threads; a 4 x 460 one 13 s with 1 thread)."""
    cores = os.cpu_count() or 1
    return 1 if others_busy_cores() > 0.5 else cores


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------

class Timings:
    """Wall seconds per (cell, phase), persisted in the work dir (phases skipped on resume keep their time)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, cell: str, phase: str, secs: float) -> None:
        from tract_dist.fsutil import atomic_write_json

        self.data.setdefault(cell, {})[phase] = round(secs, 1)
        atomic_write_json(self.path, self.data)


def run_stages(cell: str, config: Path, stages: list[str], log: Path) -> int:
    """One ``tract-dist pipeline`` invocation running ``stages`` of the cell, in a fresh process; returns the
    thread count it ran with."""
    threads = choose_threads()
    cmd = [sys.executable, "-m", "tract_dist.cli", "pipeline", str(config), "--name", cell,
           f"pipeline.stages={json.dumps(stages)}", f"cluster.threads_per_replica={threads}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[quality] {time.strftime('%H:%M:%S')} stages {', '.join(stages)} with {threads} thread(s)\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"stages {stages} of {cell} failed (rc {r.returncode}); log {log}:\n{tail}")
    return threads


def ensure_data(work: Path, s: dict[str, Any]) -> tuple[str, str]:
    from make_task import make_task, write_jsonl

    ddir = work / "data"
    meta = {"train": s["train_examples"], "test": s["test_examples"], "seed": s["task_seed"],
            "variant": s.get("task_variant", "arith")}
    mpath = ddir / "meta.json"
    if not (mpath.exists() and json.loads(mpath.read_text()) == meta):
        train, test = make_task(meta["train"], meta["test"], meta["seed"], meta["variant"])
        write_jsonl(train, ddir / "train.jsonl")
        write_jsonl(test, ddir / "test.jsonl")
        mpath.write_text(json.dumps(meta))
    return str(ddir / "train.jsonl"), str(ddir / "test.jsonl")


def cell_phases(method: str, modes: list[str]) -> list[tuple[str, list[str]]]:
    """(timings name, pipeline stages) of each phase of a cell, in order."""
    train = ([("generate", ["stage1_export", "generate", "build_stage2"]), ("train_stage2", ["train_stage2"])]
             if is_tract(method) else [("train", ["train_stage1"])])
    return train + [(f"eval_{m}", [f"evaluate_{model_stage(method)}_{BENCH}_{m}"]) for m in modes]


def share_generation(work: Path, cdir: Path, seed: int, fingerprint: str | None) -> None:
    """Hard-link the CoTs another selection cell of this seed already generated with the same fingerprint (same
    stage-1 model, k, sampling, seed) into this cell, whose generation stage then finds them all done: the rules
    are compared on the same samples, and the k x n CoTs are generated once per seed."""
    if fingerprint is None:
        return
    name = f"generate-{fingerprint[:8]}"
    target = cdir / name
    if (target / "summary.json").exists():
        return
    for other in sorted((work / "cells").glob(f"{SELECT_PREFIX}*-s{seed}")):
        src = other / name
        if other != cdir and (src / "summary.json").exists():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(src, target, copy_function=os.link)
            print(f"[quality] {cdir.name}: CoTs shared from {other.name}/{name}", flush=True)
            return


def run_cell(work: Path, s: dict[str, Any], method: str, seed: int, modes: list[str], paths: tuple[str, str],
             timings: Timings) -> None:
    from tract_dist.pipeline import plan_pipeline

    cell = f"{method}-s{seed}"
    cdir = work / "cells" / cell
    cdir.mkdir(parents=True, exist_ok=True)
    if all((eval_dir(cdir, method, m) / "summary.json").exists() for m in modes):
        return  # done (also a cell of the runner's older layout, which has no pipeline state)
    overrides = cell_overrides(s, method, seed, *paths, work)
    legacy = None if is_tract(method) else trained_model(cdir, method)
    if legacy is not None and legacy.parent.parent != cdir / "train":
        legacy = None  # trained by this runner's pipeline
    if legacy is not None:  # trained by the older runner (no pipeline state): evaluate that model
        overrides.append(f"pipeline.stage1_export={legacy}")
    cfg = _config(overrides)
    config = cdir / "pipeline.yaml"
    config.write_text(json.dumps(cfg.model_dump(), indent=1) + "\n")  # JSON is YAML; each phase's process reads it
    for phase, stages in cell_phases(method, modes):
        if legacy is not None and phase == "train":
            stages = ["stage1_export"]
        plan = plan_pipeline(cfg, name=cell)
        if all(plan[st].status == "up to date" for st in stages):
            continue
        if phase == "generate" and method.startswith(SELECT_PREFIX):
            share_generation(work, cdir, seed, plan["generate"].fingerprint)
        print(f"[quality] {time.strftime('%H:%M:%S')} {cell}: {phase} ...", flush=True)
        t0 = time.perf_counter()
        threads = run_stages(cell, config, stages, cdir / f"{phase}.log")
        timings.add(cell, phase, time.perf_counter() - t0)
        timings.add(cell, f"{phase}_threads", threads)
        print(f"[quality] {time.strftime('%H:%M:%S')} {cell}: {phase} done in {time.perf_counter() - t0:.0f}s",
              flush=True)
        if phase.startswith("train"):
            # The final checkpoint (weights + fp32 optimizer state, ~1.2 GB for SmolLM2) only serves to resume a
            # run that was cut short; once the export exists it is dead weight (15 of them filled a disk).
            run = train_dir(cdir, method)
            if run is not None:
                shutil.rmtree(run / "checkpoints", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/tract-quality", help="work dir (data, runs, logs; not committed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                    help="the baseline methods to run (the selection cells come from --select-rules)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16"],
                    help="model.dtype for training and inference; bfloat16 trains with fp32 master weights "
                         "(DeepSpeed) and is the faster choice on a CPU with AVX512-BF16 or AMX")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--variant", choices=["reference", "arith", "annotator"], default="reference",
                    help="task variant (make_task.py): reference answer in the prompt, none, or the reference prompt "
                         "with a stronger annotator's CoTs (the paper's situation, #24)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=None,
                    help="regression weight; default 1/micro-batch, the official runs' effective lambda "
                         "(../shared/FIDELITY.md: their MSE term is divided by the per-device batch twice)")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--gen-temperature", type=float, default=0.0)
    ap.add_argument("--no-extras", action="store_true", help="skip ce_cot's decode evaluation")
    ap.add_argument("--select-rules", nargs="*", default=[], choices=SELECT_RULES,
                    help="TRACT with gold-checked selection: one cell tract_<rule> per rule (#24); rules can be "
                         "added to a work dir later (the report shows every rule whose cells it holds)")
    ap.add_argument("--select-k", type=int, default=4, help="CoTs sampled per training prompt for selection")
    ap.add_argument("--select-temperature", type=float, default=1.0,
                    help="sampling temperature of those CoTs (the official inference: 1.0)")
    ap.add_argument("--select-tolerance", type=float, default=0.5, help="generation.select_tolerance")
    ap.add_argument("--select-fallback", choices=["nearest", "drop"], default="nearest",
                    help="generation.select_fallback")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality-cpu-2core"))
    ap.add_argument("--analysis", default=str(HERE / "ANALYSIS.md"), help="markdown appended as ## Analysis")
    a = ap.parse_args(argv)
    if a.lam is None:
        a.lam = 1.0 / a.micro
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    s = settings_from_args(a)
    sfile = work / "settings.json"
    if sfile.exists() and json.loads(sfile.read_text()) != s:
        raise SystemExit(f"{sfile} holds other settings; use another --work dir or the same arguments")
    sfile.write_text(json.dumps(s, indent=2))
    timings = Timings(work / "timings.json")
    args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"]
    command = "python " + " ".join([str(Path(__file__).relative_to(REPO))] + args)
    analysis = Path(a.analysis).read_text() if a.analysis and Path(a.analysis).exists() else None
    t0 = time.perf_counter()
    if not a.report_only:
        paths = ensure_data(work, s)
        order = METHODS[:2] + select_methods([r for r in SELECT_RULES if r in a.select_rules]) + METHODS[2:]
        methods = [m for m in order if m in a.methods or m.startswith(SELECT_PREFIX)]
        for seed in a.seeds:
            for method in methods:
                run_cell(work, s, method, seed, [main_mode(method)], paths, timings)
                write_report(work, s, a.seeds, Path(a.out), timings.data, None, analysis, command)
        if not a.no_extras:
            for seed in a.seeds:
                for method in methods:
                    if EXTRA_MODES.get(method):
                        run_cell(work, s, method, seed, EXTRA_MODES[method], paths, timings)
                        write_report(work, s, a.seeds, Path(a.out), timings.data, None, analysis, command)
    expected = sum(1 + (0 if a.no_extras else len(EXTRA_MODES.get(m, [])))
                   for m in list(a.methods) + select_methods(a.select_rules))
    write_report(work, s, a.seeds, Path(a.out), timings.data, None if a.report_only else time.perf_counter() - t0,
                 analysis, command, show=True, expected_rows=expected)


if __name__ == "__main__":
    main()
