"""CPU-scale quality benchmark: ce_cot vs raft vs cot_raft vs tract on the step-checking judge task.

Every (method, seed) cell trains from the seed model (SmolLM2-135M-Instruct by default) with the same examples,
steps, learning rate and seed, then is evaluated on the held-out set in the method's inference modes:

    ce_cot    CE only (lam = 0, CE on the score token)          -> cot_rail (+ decode, in the extras phase)
    raft      score-only target, no CoT                        -> rail
    cot_raft  CE over CoT + lam * (yhat - y*)^2, one stage     -> cot_rail
    tract     stage 1 = the cot_raft model of the same seed (identical config, data and seed, so the very same
              training run is reused), generation of one greedy CoT per training prompt by that model, stage 2
              = CoT-RAFT from the seed model on the self-generated CoTs with the gold scores -> cot_rail

Each phase (train / generate / build / evaluate) runs in its own subprocess (a fresh process per training:
DeepSpeed's process group and the model memory go away with it) and is skipped when its output exists, so
rerunning the same command resumes where it stopped. Cells run seed-major (all methods of seed 0, then seed
1, ...) so that a run cut short leaves complete seeds; ce_cot's decode evaluation runs last.

    python benchmarks/quality/run_quality.py --work /tmp/tract-quality --seeds 0 1 2
    python benchmarks/quality/run_quality.py --work /tmp/tract-quality --report-only   # re-aggregate

Why stage functions and not ``tract-dist pipeline``: the runner calls the same stage functions the pipeline
calls (run_training with the inline launcher, generate_cots, build_stage2_dataset, evaluate_model, each with the
pipeline's own ``stage_config`` method switches) so that TRACT's stage 1 *is* the cot_raft run of the same seed
(the pipeline would train it again) and every phase runs in a fresh process with a thread count chosen for the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

METHODS = ["cot_raft", "tract", "raft", "ce_cot"]  # cot_raft first: tract's stage 1 is its model
MAIN_MODE = {"ce_cot": "cot_rail", "raft": "rail", "cot_raft": "cot_rail", "tract": "cot_rail"}
EXTRA_MODES = {"ce_cot": ["decode"]}
METRICS = ["pearson", "spearman", "kendall", "rmse"]


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
            "launcher": "inline (one process per stage)", "max_length": 1024}


def make_config(s: dict[str, Any], method: str, seed: int, train_path: str, test_path: str, out_dir: Path,
                stage: str = "stage1") -> Any:
    from tract_dist.config import Config, load_config
    from tract_dist.pipeline import stage_config

    base = {"model": {"name_or_path": s["model"], "dtype": s.get("dtype", "auto")},
            "evaluation": {"benchmarks": [{"name": "stepcheck", "path": test_path, "format": "jsonl"}]}}
    ov = [
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
        "tracking.enabled=false", "cluster.num_workers=1",
        f"pipeline.method={'cot_raft' if method == 'tract' else method}", f"pipeline.output_dir={out_dir}",
    ]
    if s.get("tokenizer"):
        ov.append(f"model.tokenizer={s['tokenizer']}")
    cfg = load_config(None, ov, base=base)
    # The pipeline's own method switches (lam=0 + CE on the score token for ce_cot, use_cot=false for raft).
    s_cfg = stage_config(cfg, out_dir, stage=stage)
    d = s_cfg.model_dump()
    d["training"]["output_dir"] = str(out_dir)
    return Config.model_validate(d)


# ---------------------------------------------------------------------------------------------------------
# phases (each run in a subprocess: python run_quality.py --phase NAME --spec JSON)
# ---------------------------------------------------------------------------------------------------------

def phase_train(spec: dict[str, Any]) -> None:
    from tract_dist.train.trainer import run_training

    cfg = make_config(spec["settings"], spec["method"], spec["seed"], spec["train_path"], spec["test_path"],
                      Path(spec["out_dir"]))
    r = run_training(cfg, run_name=spec["run_name"], launcher="inline")
    print(json.dumps({"export": str(r.export_dir / "model"), "data": r.data_summary.get("encode_encoded")}))


def phase_generate(spec: dict[str, Any]) -> None:
    from tract_dist.generate.stage2 import build_stage2_dataset
    from tract_dist.generate.pipeline import generate_cots, load_training_examples

    cfg = make_config(spec["settings"], "cot_raft", spec["seed"], spec["train_path"], spec["test_path"],
                      Path(spec["out_dir"]))
    gen_dir = Path(spec["gen_dir"])
    s = generate_cots(cfg, spec["model"], gen_dir, show_progress=False)
    if s.get("missing"):
        raise RuntimeError(f"generation left {s['missing']} CoTs missing in {gen_dir}")
    stats = build_stage2_dataset(gen_dir, load_training_examples(cfg), spec["stage2_path"])
    print(json.dumps({"generated": s.get("ok"), "failed": s.get("failed"), **{k: v for k, v in stats.items()
                                                                                 if not k.endswith("_ids")}}))


def phase_evaluate(spec: dict[str, Any]) -> None:
    from tract_dist.config import Config
    from tract_dist.evaluate.runner import evaluate_model

    cfg = make_config(spec["settings"], spec["method"], spec["seed"], spec["train_path"], spec["test_path"],
                      Path(spec["out_dir"]))
    d = cfg.model_dump()
    d["evaluation"]["mode"] = spec["mode"]
    cfg = Config.model_validate(d)
    res = evaluate_model(cfg, spec["model"], spec["eval_dir"], show_progress=False)
    print(json.dumps(res["stepcheck"]["overall"]))


PHASES = {"train": phase_train, "generate": phase_generate, "evaluate": phase_evaluate}


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
        self.data.setdefault(cell, {})[phase] = round(secs, 1)
        self.path.write_text(json.dumps(self.data, indent=2))


def run_phase(phase: str, spec: dict[str, Any], log: Path) -> int:
    spec_path = log.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec, indent=2))
    threads = choose_threads()
    spec = {**spec, "threads": threads}
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[quality] {time.strftime('%H:%M:%S')} phase {phase} with {threads} thread(s)\n")
    with open(log, "a", encoding="utf-8") as f:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--spec",
                            str(spec_path)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"phase {phase} failed (rc {r.returncode}); log {log}:\n{tail}")
    return threads


def model_ready(run_dir: Path) -> bool:
    return (run_dir / "export" / "model" / "config.json").exists()


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


def run_cell(work: Path, s: dict[str, Any], method: str, seed: int, modes: list[str], paths: tuple[str, str],
             timings: Timings) -> None:
    train_path, test_path = paths
    cell = f"{method}-s{seed}"
    cdir = work / "cells" / cell
    cdir.mkdir(parents=True, exist_ok=True)
    common = {"settings": s, "method": method, "seed": seed, "train_path": train_path, "test_path": test_path,
              "out_dir": str(cdir)}

    def timed(phase: str, fn_phase: str, spec: dict[str, Any]) -> None:
        print(f"[quality] {time.strftime('%H:%M:%S')} {cell}: {phase} ...", flush=True)
        t0 = time.perf_counter()
        threads = run_phase(fn_phase, spec, cdir / f"{phase}.log")
        timings.add(cell, phase, time.perf_counter() - t0)
        timings.add(cell, f"{phase}_threads", threads)
        print(f"[quality] {time.strftime('%H:%M:%S')} {cell}: {phase} done in {time.perf_counter() - t0:.0f}s",
              flush=True)

    if method == "tract":
        s1_dir = work / "cells" / f"cot_raft-s{seed}" / "train"
        if not model_ready(s1_dir):
            raise RuntimeError(f"tract-s{seed} needs its stage 1 (cot_raft-s{seed}) first")
        stage2 = cdir / "stage2.jsonl"
        if not stage2.exists():
            timed("generate", "generate", {**common, "model": str(s1_dir / "export" / "model"),
                                           "gen_dir": str(cdir / "generate"), "stage2_path": str(stage2)})
        tdir = cdir / "train"
        if not model_ready(tdir):
            timed("train_stage2", "train", {**common, "train_path": str(stage2), "run_name": "train"})
    else:
        tdir = cdir / "train"
        if not model_ready(tdir):
            timed("train", "train", {**common, "run_name": "train"})
    # The final checkpoint (weights + fp32 optimizer state, ~1.2 GB for SmolLM2) only serves to resume a run
    # that was cut short; once the export exists it is dead weight (15 of them filled a disk).
    shutil.rmtree(tdir / "checkpoints", ignore_errors=True)
    model = str(tdir / "export" / "model")
    for mode in modes:
        edir = cdir / f"eval-{mode}"
        if not (edir / "summary.json").exists():
            timed(f"eval_{mode}", "evaluate", {**common, "mode": mode, "model": model, "eval_dir": str(edir)})


# ---------------------------------------------------------------------------------------------------------
# aggregation and report
# ---------------------------------------------------------------------------------------------------------

_VERDICT_OK = ("right", "correct", "holds", "true")
_VERDICT_BAD = ("wrong", "incorrect", "fails", "mistake", "not correct")


def _true_steps(test_path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """The (a, b, c) of every step of every held-out response."""
    import re

    out = {}
    for line in test_path.read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = [(int(a), int(b), int(c)) for a, b, c in re.findall(r"(\d+) \+ (\d+) = (-?\d+)", r["response"])]
    return out


_REF_BAD = ("disagree", "different", "no match", "does not match", "wrong", "incorrect")
_REF_OK = ("agree", "the same", "match", "right", "correct")


def _ref_step_checks(cot: str) -> dict[int, tuple[bool | None, tuple[int, int, int, int] | None]]:
    """Reference variant: per step number (first mention), the stated verdict and the quoted (a, b, c, answer)."""
    import re

    found: dict[int, tuple[bool | None, tuple[int, int, int, int] | None]] = {}
    for chunk in re.split(r"(?=\bStep \d:)", cot):
        m = re.match(r"Step (\d):", chunk)
        if not m or int(m.group(1)) in found:
            continue
        q = re.match(r"Step \d: (\d+) \+ (\d+) = (-?\d+)\D+Answer \d: (-?\d+)", chunk)
        rest = chunk[q.end():].lower() if q else chunk.lower()
        rest = re.split(r"\d+ (?:right |correct )?so far", rest)[0]  # the verdict, not the running count
        verdict = False if any(w in rest for w in _REF_BAD) else True if any(w in rest for w in _REF_OK) else None
        found[int(m.group(1))] = (verdict, tuple(int(x) for x in q.groups()) if q else None)
    return found


def _step_verdicts(cot: str) -> dict[int, bool]:
    """First verdict the CoT states for each step number: sentences naming "step k" and a verdict word."""
    import re

    found: dict[int, bool] = {}
    for sent in re.split(r"(?<=[.!?])\s+", cot):
        m = re.search(r"\bstep (\d)\b", sent, flags=re.I)
        if not m:
            continue
        low = sent.lower()
        bad = any(w in low for w in _VERDICT_BAD)
        ok = any(re.search(rf"\b{w}\b", low) for w in _VERDICT_OK) and not bad
        if (bad or ok) and int(m.group(1)) not in found:
            found[int(m.group(1))] = ok
    return found


def _cot_stats(pred_path: Path, truth: dict[str, list[tuple[int, int, int]]] | None = None,
               reference: bool = False) -> dict[str, Any]:
    """Mean CoT length (words), the share of CoTs whose last stated count gives the gold score, the accuracy of
    the per-step verdicts the CoTs state (over steps 1-4 of every example; a step without a verdict counts as
    wrong, so 0.5 is not the chance level of this number) and, for the reference variant, the share of steps
    quoted exactly (the response's a + b = c and the reference's answer)."""
    import re

    lens, consistent, n = [], 0, 0
    verdicts_right, quotes_right, steps_total = 0, 0, 0
    word = {"zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "all": 4}
    for line in pred_path.read_text().splitlines():
        r = json.loads(line)
        cots = r.get("detail", {}).get("cots") or []
        if not cots:
            continue
        cot = cots[0]
        n += 1
        if truth and r["id"] in truth:
            if reference:
                checks = _ref_step_checks(cot)
                for k, (a, b, c) in enumerate(truth[r["id"]], start=1):
                    verdict, quote = checks.get(k, (None, None))
                    verdicts_right += int(verdict == (a + b == c))
                    quotes_right += int(quote == (a, b, c, a + b))
                    steps_total += 1
            else:
                v = _step_verdicts(cot)
                for k, (a, b, c) in enumerate(truth[r["id"]], start=1):
                    steps_total += 1
                    verdicts_right += int(v.get(k) == (a + b == c))
        lens.append(len(cot.split()))
        m = re.findall(r"\b([0-4]|zero|none|one|two|three|four|all)\b(?: correct step| of (?:the )?(?:4|four))",
                       cot, flags=re.I)
        if m:
            k = m[-1].lower()
            k = int(k) if k.isdigit() else word[k]
            consistent += int(k + 1 == round(r["gold"]))
    return {"cot_words_mean": round(statistics.fmean(lens), 1) if lens else None,
            "cot_tally_correct": round(consistent / n, 3) if n else None,
            "step_verdict_acc": round(verdicts_right / steps_total, 3) if steps_total else None,
            "step_quote_acc": round(quotes_right / steps_total, 3) if steps_total and reference else None}


def _pred_stats(pred_path: Path) -> dict[str, Any]:
    preds = [json.loads(line)["prediction"] for line in pred_path.read_text().splitlines()]
    preds = [p for p in preds if p is not None]
    return {"pred_mean": statistics.fmean(preds) if preds else None,
            "pred_std": statistics.pstdev(preds) if len(preds) > 1 else None}


def _train_stats(cell: Path, reference: bool, train_truth: dict[str, list[tuple[int, int, int]]] | None) -> dict[str, Any]:
    """From the cell's training log: mean grad norm and CE over the first 10 steps, MSE over the last 20; for
    TRACT, the share of the stage-2 training CoTs (the stage-1 model's own) whose step verdicts are all right."""
    out: dict[str, Any] = {}
    log = cell / "train" / "metrics.jsonl"
    if log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        out = {"grad_norm_first10": statistics.fmean(r["grad_norm"] for r in rows[:10]),
               "ce_first10": statistics.fmean(r["ce"] for r in rows[:10]),
               "mse_last20": statistics.fmean(r["mse"] for r in rows[-20:])}
    stage2 = cell / "stage2.jsonl"
    if reference and train_truth and stage2.exists():
        cots = [json.loads(line) for line in stage2.read_text().splitlines()]
        ok = 0
        for r in cots:
            checks = _ref_step_checks(r["feedback"])
            steps = train_truth[r["id"].split("#")[0]]
            ok += all(checks.get(k, (None, None))[0] == (a + b == c) for k, (a, b, c) in enumerate(steps, start=1))
        out["stage2_cots_all_right"] = ok / len(cots) if cots else None
    return out


def collect(work: Path, seeds: list[int]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    test_path = work / "data" / "test.jsonl"
    truth = _true_steps(test_path) if test_path.exists() else None
    settings = work / "settings.json"
    reference = settings.exists() and json.loads(settings.read_text()).get("task_variant") == "reference"
    train_path = work / "data" / "train.jsonl"
    train_truth = _true_steps(train_path) if train_path.exists() else None
    for method in METHODS:
        for mode in [MAIN_MODE[method]] + EXTRA_MODES.get(method, []):
            key = f"{method} ({mode})"
            per_seed = {}
            for seed in seeds:
                summ = work / "cells" / f"{method}-s{seed}" / f"eval-{mode}" / "summary.json"
                if summ.exists():
                    m = json.loads(summ.read_text())["stepcheck"]["overall"]
                    pred = summ.parent / "stepcheck" / "predictions.jsonl"
                    if pred.exists():
                        m = {**m, **_pred_stats(pred)}
                    if mode != "rail" and pred.exists():
                        m = {**m, **_cot_stats(pred, truth, reference)}
                    m = {**m, **_train_stats(summ.parents[1], reference, train_truth)}
                    per_seed[str(seed)] = m
            if not per_seed:
                continue
            agg: dict[str, Any] = {}
            for k in METRICS + ["failed", "cot_words_mean", "cot_tally_correct", "step_verdict_acc", "step_quote_acc",
                                "pred_mean", "pred_std", "grad_norm_first10", "ce_first10", "mse_last20",
                                "stage2_cots_all_right"]:
                vals = [v[k] for v in per_seed.values() if v.get(k) is not None]
                vals = [float("nan") if (isinstance(x, float) and math.isnan(x)) else x for x in vals]
                if vals:
                    agg[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                              "n": len(vals)}
            rows[key] = {"method": method, "mode": mode, "seeds": per_seed, "aggregate": agg}
    return rows


def _precision(s: dict[str, Any]) -> str:
    if s.get("dtype", "auto") == "bfloat16":
        return "bf16 compute with fp32 master weights (inference in bf16)"
    return "fp32"


def write_report(work: Path, s: dict[str, Any], seeds: list[int], out_prefix: Path, timings: Timings,
                 total_wall: float | None, analysis: str | None, command: str, show: bool = False,
                 expected_rows: int = 5) -> None:
    """``expected_rows``: method x inference rows the invocation asked for (complete = all of them, all seeds)."""
    rows = collect(work, seeds)
    golds = [json.loads(line)["score"] for line in (work / "data" / "test.jsonl").read_text().splitlines()] \
        if (work / "data" / "test.jsonl").exists() else [0.0, 0.0]
    gold_mean, gold_sd = statistics.fmean(golds), statistics.pstdev(golds)
    complete = all(len(r["seeds"]) == len(seeds) for r in rows.values()) and len(rows) >= expected_rows
    phase_totals: dict[str, float] = {}
    cells_shown = {c: ph for c, ph in timings.data.items() if int(c.rsplit("-s", 1)[1]) in seeds}
    for cell, ph in cells_shown.items():
        method = cell.rsplit("-s", 1)[0]
        phase_totals[method] = round(phase_totals.get(method, 0.0) + sum(v for k, v in ph.items()
                                                                           if not k.endswith("_threads")), 1)
    data = {
        "benchmark": "quality: step-checking judge task (benchmarks/quality)",
        "machine": "cpu-2core", "platform": platform.platform(), "python": platform.python_version(),
        "status": "complete" if complete else "partial",
        "seeds": seeds, "settings": s, "results": rows,
        "wall_s_per_cell_phase": cells_shown, "wall_s_per_method_all_seeds": phase_totals,
        "wall_s_total_this_invocation": total_wall, "command": command,
    }
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    (out_prefix.parent / (out_prefix.name + ".json")).write_text(json.dumps(data, indent=2) + "\n")

    def cell(agg: dict[str, Any], k: str) -> str:
        if k not in agg:
            return "-"
        a = agg[k]
        partial = f" (n={a['n']})" if a["n"] < len(seeds) else ""
        return f"{a['mean']:.3f} ± {a['std']:.3f}{partial}"

    lines = [
        "# Quality benchmark: ce_cot vs raft vs cot_raft vs tract (CPU, 2 cores)",
        "",
        f"Status: **{data['status']}** ({', '.join(str(len(r['seeds'])) + ' seeds ' + k for k, r in rows.items())})",
        "",
        "Task: step-checking judge (benchmarks/quality/make_task.py, variant "
        f"`{s.get('task_variant', 'arith')}`): a response of 4 steps `Step i: a + b = c`",
        "(a, b in 2..9, wrong results off by 1-3); gold score = 1 + number of correct steps, uniform over 1..5;",
        ("Prometheus absolute-grading prompt with a reference answer listing the true results (`Answer i: s`); "
         "annotated CoTs quote each step next to its answer, give the verdict and a running count, in a varied "
         "3-template style." if s.get("task_variant") == "reference" else
         "Prometheus absolute-grading prompt without reference answer; annotated CoTs in a varied 3-template style."),
        "",
        f"Model `{s['model']}`; {s['train_examples']} training / {s['test_examples']} held-out examples "
        f"(task seed {s['task_seed']}); every method: {s['epochs']} epoch(s), micro batch {s['micro_batch_size']} x "
        f"accum {s['grad_accum']}, lr {s['learning_rate']} cosine, warm-up {s['warmup_ratio']}, lam {s['lam']} "
        f"(0 for ce_cot), 1 worker, ZeRO stage 0, {_precision(s)}; inference greedy, max {s['max_new_tokens']} new tokens. "
        f"TRACT stage 1 = the cot_raft model of the same seed; stage 2 trains the seed model on one "
        f"{'greedy' if s['gen_temperature'] == 0 else 'T=' + str(s['gen_temperature'])} self-generated CoT per "
        f"training prompt with the same budget.",
        "",
        "Mean ± sample std over the seeds that finished (of " + ", ".join(map(str, seeds)) + "), held-out set:",
        "",
        "| method (inference) | λ | Pearson ↑ | Spearman ↑ | Kendall ↑ | RMSE ↓ | failed | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        a = r["aggregate"]
        lam = 0 if r["method"] == "ce_cot" else s["lam"]
        lines.append(f"| {key} | {lam:g} | {cell(a, 'pearson')} | {cell(a, 'spearman')} | {cell(a, 'kendall')} | "
                     f"{cell(a, 'rmse')} | {cell(a, 'failed')} | {len(r['seeds'])} |")
    lines += ["", "Diagnostics (same seeds): prediction mean / spread across the held-out set (gold: mean "
              f"{gold_mean:.2f}, sd {gold_sd:.2f}); `step verdicts` = share of the 4 x n steps whose verdict "
              "(right / wrong) the generated CoT states correctly (a step without a verdict counts as missed); "
              "`step quotes` = share of steps whose `a + b = c` and reference answer the CoT quotes exactly "
              "(reference variant); `tally ok` = share of CoTs whose last stated count equals the gold count; "
              "`words` = mean CoT length.", "",
              "| method (inference) | pred mean | pred sd | step verdicts | step quotes | tally ok | words |",
              "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        a = r["aggregate"]
        lines.append(f"| {key} | {cell(a, 'pred_mean')} | {cell(a, 'pred_std')} | {cell(a, 'step_verdict_acc')} | "
                     f"{cell(a, 'step_quote_acc')} | {cell(a, 'cot_tally_correct')} | {cell(a, 'cot_words_mean')} |")
    lines += ["", "Training (same seeds; for tract, its stage 2): mean gradient norm (before clipping) and CE over "
              "the first 10 steps, MSE over the last 20; `stage-2 CoTs right` = share of the stage-1 model's own "
              "training CoTs whose every step verdict is right (what stage 2 learns from).", "",
              "| method | grad norm, steps 1-10 | CE, steps 1-10 | MSE, last 20 steps | stage-2 CoTs right |",
              "|---|---|---|---|---|"]
    for key, r in rows.items():
        if r["mode"] != MAIN_MODE[r["method"]]:
            continue
        a = r["aggregate"]
        lines.append(f"| {r['method']} | {cell(a, 'grad_norm_first10')} | {cell(a, 'ce_first10')} | "
                     f"{cell(a, 'mse_last20')} | {cell(a, 'stage2_cots_all_right')} |")
    lines += ["", "Per seed (Pearson / RMSE):", ""]
    for key, r in rows.items():
        def fmt(x: Any) -> str:
            return "undefined" if x is None else f"{x:.3f}"

        per = ", ".join(f"s{sd}: {fmt(m.get('pearson'))} / {fmt(m.get('rmse'))} (failed {m.get('failed')})"
                        for sd, m in r["seeds"].items())
        lines.append(f"- {key}: {per}")
    lines += ["", "Wall time (s, all seeds, incl. model loading; tract = generation + stage 2 only, its stage 1 is "
              "cot_raft's run): " + ", ".join(f"{k} {v:.0f}" for k, v in phase_totals.items())
              + f"; all phases together {sum(phase_totals.values()):.0f} s. Each phase ran with 2 torch threads, or 1 "
              "when other processes kept a core busy at its start (per-phase times and threads in the JSON).", ""]
    if total_wall is not None:
        lines.append(f"Wall time of the invocation that wrote this file: {total_wall:.0f} s.")
        lines.append("")
    lines += ["Command:", "", "```", command, "```", ""]
    if analysis:
        lines += ["## Analysis", "", analysis.strip(), ""]
    (out_prefix.parent / (out_prefix.name + ".md")).write_text("\n".join(lines))
    if show:
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/tract-quality", help="work dir (data, runs, logs; not committed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16"],
                    help="model.dtype for training and inference; bfloat16 trains with fp32 master weights "
                         "(DeepSpeed) and is the faster choice on a CPU with AVX512-BF16 or AMX")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--task-seed", type=int, default=0)
    ap.add_argument("--variant", choices=["reference", "arith"], default="reference",
                    help="task variant (make_task.py): reference answer in the prompt, or none")
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
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality-cpu-2core"))
    ap.add_argument("--analysis", default=str(HERE / "ANALYSIS.md"), help="markdown appended as ## Analysis")
    a = ap.parse_args(argv)
    if a.lam is None:
        a.lam = 1.0 / a.micro
    if a.phase:
        spec = json.loads(Path(a.spec).read_text())
        if spec.get("threads"):
            import torch

            from tract_dist.runtime.pool import PoolSpec

            torch.set_num_threads(spec["threads"])
            PoolSpec.torch_threads = lambda self: spec["threads"]  # evaluation/generation workers set theirs
        PHASES[a.phase](spec)
        return

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
        methods = [m for m in METHODS if m in a.methods]
        for seed in a.seeds:
            for method in methods:
                run_cell(work, s, method, seed, [MAIN_MODE[method]], paths, timings)
                write_report(work, s, a.seeds, Path(a.out), timings, None, analysis, command)
        if not a.no_extras:
            for seed in a.seeds:
                for method in methods:
                    if EXTRA_MODES.get(method):
                        run_cell(work, s, method, seed, EXTRA_MODES[method], paths, timings)
                        write_report(work, s, a.seeds, Path(a.out), timings, None, analysis, command)
    expected = sum(1 + (0 if a.no_extras else len(EXTRA_MODES.get(m, []))) for m in a.methods)
    write_report(work, s, a.seeds, Path(a.out), timings, None if a.report_only else time.perf_counter() - t0,
                 analysis, command, show=True, expected_rows=expected)


if __name__ == "__main__":
    main()
