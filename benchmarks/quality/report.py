"""The quality benchmark's aggregation and report: per (method, inference) row, mean +- sample std over seeds of
the held-out metrics and of the diagnostics read from the cells' predictions and training logs; writes
``OUT.json`` and ``OUT.md`` (the analysis text comes from ANALYSIS.md).

A work dir's cells come in two layouts, both read here:

- ``cells/<method>-s<seed>/`` as a pipeline folder (run_quality.py drives ``tract-dist pipeline``): its
  ``state.json`` names the training run folders; evaluations in ``evaluate/<stage>-stepcheck-<mode>/``;
- the layout of the runner before it used the pipeline: ``train/`` (the run) and ``eval-<mode>/``.

Both: ``<eval dir>/summary.json`` (``stepcheck.overall``), ``<eval dir>/stepcheck/predictions.jsonl``,
``<run>/metrics.jsonl``, ``stage2.jsonl`` (TRACT); ``settings.json``, ``timings.json`` and ``data/`` at the top.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

METHODS = ["cot_raft", "tract", "raft", "ce_cot"]  # cot_raft first: tract's stage 1 is its model
SELECT_PREFIX = "tract_"  # tract_<rule>: TRACT with gold-checked selection (#24), k CoTs per prompt, one rule
MAIN_MODE = {"ce_cot": "cot_rail", "raft": "rail", "cot_raft": "cot_rail", "tract": "cot_rail"}


def select_methods(rules: list[str] | None) -> list[str]:
    """The gold-checked-selection cells' method names, one per rule (``tract_nearest``, ...)."""
    return [f"{SELECT_PREFIX}{r}" for r in rules or []]


def is_tract(method: str) -> bool:
    """TRACT and its gold-checked-selection variants: stage 1 is the cot_raft cell's model, the row is stage 2."""
    return method == "tract" or method.startswith(SELECT_PREFIX)


def main_mode(method: str) -> str:
    return "cot_rail" if is_tract(method) else MAIN_MODE[method]


SELECT_RULES = ["all", "nearest", "within", "weighted"]


def all_methods(work: Path, rules: list[str] | None = None) -> list[str]:
    """Every method of a work dir in the runner's order (selection cells right after tract): the baselines, the
    selection rules ``rules`` asks for and those whose cells the work dir already holds."""
    found = {c.name.rsplit("-s", 1)[0][len(SELECT_PREFIX):] for c in (work / "cells").glob(f"{SELECT_PREFIX}*-s*")
             if c.is_dir()}
    wanted = set(rules or []) | found
    return METHODS[:2] + select_methods([r for r in SELECT_RULES if r in wanted]) + METHODS[2:]
EXTRA_MODES = {"ce_cot": ["decode"]}
METRICS = ["pearson", "spearman", "kendall", "rmse"]
BENCH = "stepcheck"  # the held-out benchmark's name (a folder under each evaluation)


def model_stage(method: str) -> str:
    """The pipeline stage whose model a method's row reports: TRACT's stage 2, the others' stage 1."""
    return "stage2" if is_tract(method) else "stage1"


def _state(cell: Path) -> dict[str, Any]:
    p = cell / "state.json"
    return json.loads(p.read_text()).get("stages", {}) if p.exists() else {}


def eval_dir(cell: Path, method: str, mode: str) -> Path:
    """Where a cell's evaluation in ``mode`` is (or will be): the older layout's folder if it holds a result."""
    legacy = cell / f"eval-{mode}"
    if (legacy / "summary.json").exists():
        return legacy
    return cell / "evaluate" / f"{model_stage(method)}-{BENCH}-{mode}"


def train_dir(cell: Path, method: str) -> Path | None:
    """The training run a cell's row reports (TRACT: its stage 2), or None before it has run."""
    rec = _state(cell).get(f"train_{model_stage(method)}")
    run = rec.get("outputs", {}).get("run_dir") if rec else None
    if run:
        return Path(run)
    return cell / "train" if (cell / "train").is_dir() else None


def trained_model(cell: Path, method: str) -> Path | None:
    """The exported model of a cell (TRACT: stage 2), or None before it exists."""
    stages = _state(cell)
    for name in ["train_stage2"] if is_tract(method) else ["train_stage1", "stage1_export"]:
        model = stages.get(name, {}).get("outputs", {}).get("model")
        if model and Path(model).exists():
            return Path(model)
    legacy = cell / "train" / "export" / "model"
    return legacy if (legacy / "config.json").exists() else None


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


def _train_stats(cell: Path, method: str, reference: bool,
                 train_truth: dict[str, list[tuple[int, int, int]]] | None) -> dict[str, Any]:
    """From the cell's training log: mean grad norm and CE over the first 10 steps, MSE over the last 20; for
    TRACT, the share of the stage-2 training CoTs (the stage-1 model's own) whose step verdicts are all right
    (weighted by their stage-2 weight), and the selection's counts (state.json): the share of the generated
    CoTs whose read-out is within 0.5 of y* before and after selection, CoTs generated and kept."""
    out: dict[str, Any] = {}
    run = train_dir(cell, method)
    log = run / "metrics.jsonl" if run else None
    if log is not None and log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        out = {"grad_norm_first10": statistics.fmean(r["grad_norm"] for r in rows[:10]),
               "ce_first10": statistics.fmean(r["ce"] for r in rows[:10]),
               "mse_last20": statistics.fmean(r["mse"] for r in rows[-20:])}
    stage2 = cell / "stage2.jsonl"
    if train_truth and stage2.exists():
        cots = [json.loads(line) for line in stage2.read_text().splitlines()]
        ok = total = 0.0
        for r in cots:
            steps = train_truth[r["id"].split("#")[0]]
            if reference:
                verdicts = {k: v for k, (v, _) in _ref_step_checks(r["feedback"]).items()}
            else:
                verdicts = _step_verdicts(r["feedback"])
            w = float(r.get("weight") if r.get("weight") is not None else 1.0)
            ok += w * all(verdicts.get(k) == (a + b == c) for k, (a, b, c) in enumerate(steps, start=1))
            total += w
        out["stage2_cots_all_right"] = ok / total if total else None
    sel = _state(cell).get("build_stage2", {}).get("outputs", {}).get("selection") or {}
    for key in ("within_0.5_before", "within_0.5_after", "cots_before", "kept", "mae_before", "mae_after"):
        if sel.get(key) is not None:
            out[f"select_{key}"] = sel[key]
    return out


def collect(work: Path, seeds: list[int]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    test_path = work / "data" / "test.jsonl"
    truth = _true_steps(test_path) if test_path.exists() else None
    settings = work / "settings.json"
    s = json.loads(settings.read_text()) if settings.exists() else {}
    reference = s.get("task_variant") == "reference"  # annotator CoTs state verdicts as the arith ones do
    train_path = work / "data" / "train.jsonl"
    train_truth = _true_steps(train_path) if train_path.exists() else None
    for method in all_methods(work):
        for mode in [main_mode(method)] + EXTRA_MODES.get(method, []):
            key = f"{method} ({mode})"
            per_seed = {}
            for seed in seeds:
                cell = work / "cells" / f"{method}-s{seed}"
                summ = eval_dir(cell, method, mode) / "summary.json"
                if summ.exists():
                    m = json.loads(summ.read_text())[BENCH]["overall"]
                    pred = summ.parent / BENCH / "predictions.jsonl"
                    if pred.exists():
                        m = {**m, **_pred_stats(pred)}
                    if mode != "rail" and pred.exists():
                        m = {**m, **_cot_stats(pred, truth, reference)}
                    m = {**m, **_train_stats(cell, method, reference, train_truth)}
                    per_seed[str(seed)] = m
            if not per_seed:
                continue
            agg: dict[str, Any] = {}
            for k in METRICS + ["failed", "cot_words_mean", "cot_tally_correct", "step_verdict_acc", "step_quote_acc",
                                "pred_mean", "pred_std", "grad_norm_first10", "ce_first10", "mse_last20",
                                "stage2_cots_all_right", "select_within_0.5_before", "select_within_0.5_after",
                                "select_cots_before", "select_kept", "select_mae_before", "select_mae_after"]:
                vals = [v[k] for v in per_seed.values() if v.get(k) is not None]
                vals = [float("nan") if (isinstance(x, float) and math.isnan(x)) else x for x in vals]
                if vals:
                    agg[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                              "n": len(vals)}
            rows[key] = {"method": method, "mode": mode, "seeds": per_seed, "aggregate": agg}
    return rows


_TASK_TEXT = {
    "reference": "Prometheus absolute-grading prompt with a reference answer listing the true results (`Answer i: s`); "
                 "annotated CoTs quote each step next to its answer, give the verdict and a running count, in a varied "
                 "3-template style.",
    "arith": "Prometheus absolute-grading prompt without reference answer; annotated CoTs in a varied 3-template style.",
    "annotator": "Prometheus absolute-grading prompt with a reference answer listing the true results (`Answer i: s`), "
                 "as in `reference`; the annotated CoTs are a stronger annotator's, in the paper's situation: they never "
                 "quote the reference, re-derive every sum in words, state each wrong result's offset and a product as "
                 "a cross-check, and give only a closing tally (varied 3-template style), so the small model cannot "
                 "reproduce them and stage 2 matters.",
}


def _select_text(s: dict[str, Any]) -> str:
    sel = s.get("select")
    if not sel:
        return ""
    return (f" `tract_<rule>` = TRACT with gold-checked selection (#24): the same stage 1, k = {sel['k']} CoTs per "
            f"training prompt sampled at T={sel['temperature']}, each read out by RAIL as it is written; "
            f"generation.select=<rule> (tolerance {sel['tolerance']}, fallback {sel['fallback']}) builds the stage-2 "
            f"data, and stage 2 trains {sel['steps']} optimizer steps, the others' budget.")


def _precision(s: dict[str, Any]) -> str:
    if s.get("dtype", "auto") == "bfloat16":
        return "bf16 compute with fp32 master weights (inference in bf16)"
    return "fp32"


def write_report(work: Path, s: dict[str, Any], seeds: list[int], out_prefix: Path, timings: dict[str, dict[str, float]],
                 total_wall: float | None, analysis: str | None, command: str, show: bool = False,
                 expected_rows: int = 5) -> None:
    """Write ``out_prefix``.json and .md from the cells of ``work``; ``timings``: wall seconds per cell and phase
    (timings.json). ``expected_rows``: method x inference rows the invocation asked for (complete = all of them,
    all seeds)."""
    rows = collect(work, seeds)
    golds = [json.loads(line)["score"] for line in (work / "data" / "test.jsonl").read_text().splitlines()] \
        if (work / "data" / "test.jsonl").exists() else [0.0, 0.0]
    gold_mean, gold_sd = statistics.fmean(golds), statistics.pstdev(golds)
    complete = all(len(r["seeds"]) == len(seeds) for r in rows.values()) and len(rows) >= expected_rows
    phase_totals: dict[str, float] = {}
    cells_shown = {c: ph for c, ph in timings.items() if int(c.rsplit("-s", 1)[1]) in seeds}
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
        _TASK_TEXT.get(s.get("task_variant", "arith"), _TASK_TEXT["arith"]),
        "",
        f"Model `{s['model']}`; {s['train_examples']} training / {s['test_examples']} held-out examples "
        f"(task seed {s['task_seed']}); every method: {s['epochs']} epoch(s), micro batch {s['micro_batch_size']} x "
        f"accum {s['grad_accum']}, lr {s['learning_rate']} cosine, warm-up {s['warmup_ratio']}, lam {s['lam']} "
        f"(0 for ce_cot), 1 worker, ZeRO stage 0, {_precision(s)}; inference greedy, max {s['max_new_tokens']} new tokens. "
        f"TRACT stage 1 = the cot_raft model of the same seed; stage 2 trains the seed model on one "
        f"{'greedy' if s['gen_temperature'] == 0 else 'T=' + str(s['gen_temperature'])} self-generated CoT per "
        f"training prompt with the same budget." + _select_text(s),
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
              "the first 10 steps, MSE over the last 20; `stage-2 CoTs right` = share of the stage-2 training CoTs "
              "(the stage-1 model's own, as selected and weighted) whose every step verdict is right (what stage 2 "
              "learns from); `ŷ within 0.5` = share of the generated CoTs whose own RAIL read-out lies within 0.5 "
              "of the gold score, before -> after selection (weighted); `CoTs kept` = generated -> kept.", "",
              "| method | grad norm, steps 1-10 | CE, steps 1-10 | MSE, last 20 steps | stage-2 CoTs right | "
              "ŷ within 0.5 before -> after | CoTs kept |",
              "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if r["mode"] != main_mode(r["method"]):
            continue
        a = r["aggregate"]
        within = "-" if "select_within_0.5_before" not in a else \
            f"{cell(a, 'select_within_0.5_before')} -> {cell(a, 'select_within_0.5_after')}"
        kept = "-" if "select_kept" not in a else \
            f"{a['select_cots_before']['mean']:.0f} -> {a['select_kept']['mean']:.0f}"
        lines.append(f"| {r['method']} | {cell(a, 'grad_norm_first10')} | {cell(a, 'ce_first10')} | "
                     f"{cell(a, 'mse_last20')} | {cell(a, 'stage2_cots_all_right')} | {within} | {kept} |")
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
