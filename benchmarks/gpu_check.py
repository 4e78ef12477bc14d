"""The one prepared GPU check: every CUDA measurement the project needs, in one run of a few minutes.

Runs on a machine with only torch, triton and transformers (no Ray, DeepSpeed, MLflow or vLLM), e.g. the
lent H100/H200, and writes JSON + markdown into ``--out``:

  1. loss_tests    the CUDA loss tests (``pytest tests/loss -m gpu``): Triton kernels against the reference,
                   host synchronisations per call, memory;
  2. loss_bench    ``benchmarks/loss/bench_loss.py`` at the paper's shape (16384 tokens, H 4096, V 128256):
                   naive, naive_sliced, torch.compile, Liger, Cut Cross-Entropy, fused (torch and Triton),
                   uniform and realistic batches, bf16 (with torch.compile) and fp32 (without it);
  3. train_step    ``benchmarks/train/bench_step.py --preset gpu-1b``: one training step of the ~1.2B
                   Llama-3-shaped model with the fused vs the reference head;
  4. generation    the HF half of ``benchmarks/generate/bench_backends.py`` on CUDA (random-1b, bf16): CoT
                   generation tokens/s at batch 1/8/32/64 and at the quickstart's shape, CoT-RAIL examples/s;
  5. train_packing ``benchmarks/train/bench_packing.py`` (random-1b, bf16, gradient checkpointing): packed rows of
                   16,384 tokens vs padded micro-batches of 8 (and length-grouped) on the Vicuna sample's and
                   Feedback-Collection-like lengths, useful tokens/s, padding, peak memory; with the default
                   attention (flash-attention varlen if it imports, else one sdpa call per example; packed_mask: sdpa's
                   block-diagonal mask) and with
                   transformers' flex_attention (block-sparse packed mask, compiled by torch);
  6. plan_memory   ``tract-dist plan``'s estimate of one training step's activations and loss head against
                   ``max_memory_allocated`` (the train_step model, checkpointing off and on:
                   ``benchmarks/plan/bench_plan_memory.py --step``).
  7. real_step     ``benchmarks/real/bench_real_step.py`` (random-1b, bf16): one REAL round, 4 prompts x 8 CoTs of up
                   to 256 tokens: rollout and update samples/s, the weight hand-over.
vLLM is not measured here: its wheel is too large to travel to the device machine, so the vLLM/HF ratio, tensor
parallelism and served LoRA on GPU stay unmeasured until a machine with vLLM is lent.

Every stage runs even if an earlier one failed; its status, time and output tail land in the summary, and
at most 8 files are written (what the device tool brings back). Three pure-Python wheels must travel:
Liger-Kernel and Cut Cross-Entropy (``requirements/peers.txt``) and llama-models (the Llama-3 tokenizer of
the generation stage's random-1b model). With the other packages absent (Ray, DeepSpeed, MLflow, vLLM,
datasets, pydantic, PEFT), ``--smoke`` still passes every stage (checked by hiding them from the import
system). Here, once (repository root):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 llama-models==0.3.0

then on the GPU machine (device tool: ``carry=[".whl"]``, a timeout that leaves room for one rerun):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

and commit ``$OUT`` under ``benchmarks/results/gpu-check-<card>/``. On CPU, ``--smoke`` runs the same code
at tiny shapes in about a minute (``tests/benchmarks/test_gpu_check_smoke.py``):

    python benchmarks/gpu_check.py --smoke --out /tmp/gpucheck
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "loss"))
sys.path.insert(0, str(REPO / "benchmarks" / "train"))


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def _subprocess(cmd: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    return {"status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})", "tail": tail}


def stage_loss_tests(out: Path, smoke: bool) -> dict[str, Any]:
    return _subprocess([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                        "tests/loss/test_loss_gpu.py", "-rs"], timeout=240)


def stage_loss_bench(out: Path, smoke: bool) -> dict[str, Any]:
    import bench_loss

    common = ["--smoke"] if smoke else []
    reports = []
    # bf16 is the path that matters on GPUs: every provider, torch.compile included. fp32 without
    # torch.compile (its compile time would dominate the check's budget).
    for dtypes, extra in (("bf16", []), ("fp32", ["--no-compile"])):
        if smoke:
            extra = ["--no-compile"]
        args = bench_loss.parse_args(common + ["--dtypes", dtypes, "--out", str(out / f"loss-{dtypes}"), *extra])
        reports.append(bench_loss.run(args))
        (out / f"loss-{dtypes}.md").unlink(missing_ok=True)  # the summary holds the table; few files travel back
    rows = [r for rep in reports for r in rep["rows"]]
    return {"status": "ok", "rows": rows, "table": bench_loss.format_table(rows)}


def stage_train_step(out: Path, smoke: bool) -> dict[str, Any]:
    import torch

    import bench_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = bench_step.run("smoke" if smoke else "gpu-1b", device, out / "train-step")
    return {"status": "ok", "report": report}


def stage_generation(out: Path, smoke: bool) -> dict[str, Any]:
    """The HF half of ``bench_backends.py`` (vLLM's wheel does not travel): CoT generation tokens/s per batch
    size and at the quickstart's shape, CoT-RAIL examples/s."""
    cmd = [sys.executable, "benchmarks/generate/bench_backends.py", "--backends", "hf", "--out", str(out / "generate")]
    if smoke:
        cmd += ["--model", "tiny", "--prompts", "4", "--max-new-tokens", "4", "--batch-sizes", "1,2", "--quickstart",
                "", "--rail-examples", "2", "--repeats", "1"]
    else:
        cmd += ["--device", "cuda", "--model", "random-1b", "--prompts", "64", "--max-new-tokens", "128",
                "--batch-sizes", "1,8,32,64"]
    return _subprocess(cmd, timeout=300)


def stage_train_packing(out: Path, smoke: bool) -> dict[str, Any]:
    """Packed vs padded training steps (``bench_packing.py``); on CUDA once more with flex_attention, whose
    block mask skips the cross-example blocks that sdpa's dense mask computes. The reports go into the summary
    (few files travel back)."""
    import bench_packing

    if smoke:
        runs = {"default": ["--smoke", "--device", "cpu"]}
    else:
        common = ["--device", "cuda", "--model", "random-1b", "--bf16", "--samples", "32", "--micro", "8",
                  "--budget", "16384", "--steps", "3"]
        runs = {"default": common, "flex_attention": common + ["--attn", "flex_attention"]}
    reports, status = {}, "ok"
    for name, argv in runs.items():
        try:
            reports[name] = bench_packing.run(bench_packing.parse_args(argv))
        except Exception as exc:  # noqa: BLE001 - flex_attention may not compile on every stack: record why
            reports[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            status = "ok" if name != "default" else f"failed: {reports[name]['error']}"
    tables = {k: bench_packing.format_table(r) for k, r in reports.items() if "rows" in r}
    return {"status": status, "reports": reports, "tables": tables}


def stage_plan_memory(out: Path, smoke: bool) -> dict[str, Any]:
    """``tract-dist plan``'s activation and loss-head estimate against ``max_memory_allocated`` of one fused-head
    training step of the train_step stage's model (checkpointing off and on): the memory the plan adds to
    DeepSpeed's model-state estimator (DeepSpeed is not installed here)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks" / "plan"))
    import bench_plan_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_plan_memory.step_case("smoke" if smoke else "gpu-1b", device, ckpt) for ckpt in (False, True)]
    return {"status": "ok", "rows": rows, "table": bench_plan_memory.step_table(rows)}


def stage_real_step(out: Path, smoke: bool) -> dict[str, Any]:
    """One REAL round (``benchmarks/real/bench_real_step.py``): rollout samples/s (HF generate + the read-out /
    sampling log-prob forward), update samples/s (REAL's loss, fwd + bwd + AdamW) and the weight hand-over (every
    weight: PEFT does not travel, so the check's policy is fully fine-tuned; LoRA where PEFT is importable)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "real"))
    import bench_real_step

    argv = ["--out", str(out / "real-step")]
    if smoke:
        argv += ["--model", "tiny", "--prompts", "1", "--k", "2", "--max-new-tokens", "4"]
    else:
        argv += ["--model", "random-1b", "--device", "cuda", "--dtype", "bfloat16", "--prompts", "4", "--k", "8",
                 "--max-new-tokens", "256", "--max-length", "2048", "--micro-batch", "8"]
    bench_real_step.main(argv)
    report = json.loads((out / "real-step.json").read_text())
    for ext in ("md", "json"):  # the summary holds the numbers; few files travel back
        (out / f"real-step.{ext}").unlink(missing_ok=True)
    return {"status": "ok", "report": {k: v for k, v in report.items() if k != "rounds"},
            "last_round": report["rounds"][-1]}


STAGES: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "loss_tests": stage_loss_tests,
    "loss_bench": stage_loss_bench,
    "train_step": stage_train_step,
    "generation": stage_generation,
    "train_packing": stage_train_packing,
    "plan_memory": stage_plan_memory,
    "real_step": stage_real_step,
}


def summarize(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# GPU check: {meta['machine']}", "",
             f"{meta['date']}, torch {meta['torch']}, python {meta['python']}, smoke={meta['smoke']}.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.1f} |")
    if "table" in results.get("loss_bench", {}):
        lines += ["", "## Loss head", "", results["loss_bench"]["table"]]
    step = results.get("train_step", {}).get("report")
    if step:
        lines += ["", "## Training step (fused vs reference head)", "", "```json", json.dumps(step, indent=2), "```"]
    for attn, table in results.get("train_packing", {}).get("tables", {}).items():
        lines += ["", f"## Packed vs padded training steps ({attn} attention)", "", table]
    if "table" in results.get("plan_memory", {}):
        lines += ["", "## Plan vs max_memory_allocated (one training step's activations and loss head)", "",
                  results["plan_memory"]["table"]]
    real = results.get("real_step", {})
    if real.get("report"):
        lines += ["", "## One REAL round (rollout, update, hand-over)", "", "```json",
                  json.dumps({**real["report"], "last_round": real.get("last_round")}, indent=2), "```"]
    for name, r in results.items():
        if r.get("tail") and (r["status"] != "ok" or name == "loss_tests"):
            lines += ["", f"## {name}: output tail", "", "```", r.get("tail", ""), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.{json,md} and each stage's files")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that every stage runs")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of stages to run")
    args = ap.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=_machine(), torch=torch.__version__, python=platform.python_version(), smoke=args.smoke,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cuda=torch.cuda.is_available())
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    for name in args.stages.split(","):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            results[name] = STAGES[name](out, args.smoke)
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not cost the others' results
            results[name] = {"status": f"failed: {type(exc).__name__}: {str(exc)[:500]}"}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {results[name]['status']} ({results[name]['seconds']:.0f} s)", flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(summarize(results, meta))
    print(f"[gpu_check] wrote {out / 'gpu_check.md'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
