"""The README's main job (``configs/quickstart.yaml``, the whole TRACT pipeline) end to end with each inference
backend, one after the other in alternating order, so the quickstart can use whichever is faster here.

    python benchmarks/generate/bench_quickstart_backends.py            # hf and vllm, once each, ~25 min on 2 cores

``bench_backends.py`` times the engines alone; this times what a user waits for: engine start-ups (vLLM's is
~30 s per replica on a CPU), Ray Data actors, model loading and the work itself. Each run gets its own
temporary folder (training runs, Ray storage, MLflow store), the same config otherwise. Per stage the time is
the gap between the stage's ``finished_at`` in the pipeline's ``state.json`` and the previous stage's (the first
stage from the command's start, so it includes Ray start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quickstart.yaml"


def run_config(backend: str, work: Path) -> Path:
    """The quickstart config with paths made absolute, outputs under ``work`` and both backends set."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"]["train_path"] = str(REPO / cfg["data"]["train_path"])
    for b in cfg["evaluation"]["benchmarks"]:
        b["path"] = str(REPO / b["path"])
    cfg["training"]["output_dir"] = str(work / "runs")
    cfg["pipeline"]["output_dir"] = str(work / "runs" / "pipeline")
    cfg.setdefault("cluster", {})["storage_path"] = str(work / "ray")
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    cfg["generation"]["backend"] = cfg["evaluation"]["backend"] = backend
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_once(backend: str, root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"qs-{backend}-", dir=root))
    config = run_config(backend, work)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tract_dist.cli", "pipeline", str(config)], cwd=work, env=env,
                          capture_output=True, text=True)
    wall = time.time() - t0
    out: dict[str, Any] = {"backend": backend, "rc": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        out["tail"] = (proc.stdout + proc.stderr)[-3000:]
        return out
    state = json.loads(next((work / "runs" / "pipeline").glob("*/state.json")).read_text())
    results = json.loads(next((work / "runs" / "pipeline").glob("*/results.json")).read_text())
    prev, stages = t0, {}
    for name, rec in sorted(state["stages"].items(), key=lambda kv: kv[1]["finished_at"]):
        stages[name] = rec["finished_at"] - prev
        prev = rec["finished_at"]
    out.update(stages_s=stages, results=results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart-backends-cpu-2core"))
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as root:
        for k in range(args.repeats):
            for b in backends if k % 2 == 0 else backends[::-1]:
                r = run_once(b, Path(root))
                runs.append(r)
                print(f"{b}: rc {r['rc']}, {r['wall_s']:.1f} s", flush=True)
                if r["rc"] != 0:
                    print(r["tail"], file=sys.stderr)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load_start": load_start, "load_end": os.getloadavg(), "runs": runs,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()}
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(format_report(report))
    print(format_report(report))
    if any(r["rc"] != 0 for r in runs):
        sys.exit(1)


def format_report(rep: dict[str, Any]) -> str:
    ok = [r for r in rep["runs"] if r["rc"] == 0]
    names = list(dict.fromkeys(n for r in ok for n in r["stages_s"]))
    lines = [f"# The quickstart end to end per inference backend — {rep['machine']}", "",
             f"`benchmarks/generate/bench_quickstart_backends.py` at {rep['commit']}: `configs/quickstart.yaml` "
             f"(the whole TRACT pipeline) with `generation.backend` = `evaluation.backend` = each backend, runs in "
             f"alternating order. Load average at start {', '.join(f'{x:.1f}' for x in rep['load_start'])}, at end "
             f"{', '.join(f'{x:.1f}' for x in rep['load_end'])}. Seconds per stage (the first includes Ray "
             "start-up).", "",
             "| stage | " + " | ".join(r["backend"] for r in ok) + " |",
             "|---|" + "---|" * len(ok)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['stages_s'].get(n, float('nan')):.1f}" for r in ok) + " |")
    lines.append("| **total (wall)** | " + " | ".join(f"**{r['wall_s']:.1f}**" for r in ok) + " |")
    lines += ["", "Pearson per evaluation (the same seeds; the backends sample differently, so stage 2 trains on "
              "different CoTs):", ""]
    for r in ok:
        lines.append(f"- {r['backend']}: " + ", ".join(f"{k} {v['metrics']['overall']['pearson']:.3f}"
                                                      for k, v in r["results"].items()))
    for r in rep["runs"]:
        if r["rc"] != 0:
            lines.append(f"- {r['backend']}: failed (exit {r['rc']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
