"""What a new user waits for: ``scripts/setup-env.sh`` from nothing, then ``bash scripts/quickstart.sh`` (the main
job: the whole TRACT pipeline of ``configs/quickstart.yaml``), stage by stage, with the load beside each number.

    # the set-up from scratch (a fresh clone of HEAD and a fresh virtual environment, both thrown away), then the
    # quickstart in that clone with that environment: what a newcomer runs
    python benchmarks/pipeline/bench_quickstart.py --setup
    # the quickstart only, with an existing environment (its set-up stamp must match this checkout's pins)
    python benchmarks/pipeline/bench_quickstart.py --venv .venv
    # side by side with an earlier commit (alternating order, the same environment)
    python benchmarks/pipeline/bench_quickstart.py --venv .venv --baseline 80c447f --repeats 2
    # the set-up of HEAD and of an earlier commit, each from scratch, alternating (then HEAD's quickstart)
    python benchmarks/pipeline/bench_quickstart.py --setup --setup-baseline 80c447f

Every run is a fresh ``git clone`` of a commit (HEAD, or ``--baseline``) into a temporary folder, so nothing of
an earlier run (runs/, mlflow.db, Ray storage) is reused; ``~/.cache`` (pip's, and the project's alias and
DeepSpeed caches) is what a user's machine has, and is reported as warm or cold. Per stage: the gap between the
stage's ``finished_at`` in the pipeline's ``state.json`` and the previous one's (the first stage includes Ray's
start-up); per training stage also the workers' own split (``timings_s`` of ``train_result.json``: setup, steps,
checkpoints, export; the driver's fit and MLflow model logging). Peak memory: the largest resident set of the
command's process tree, sampled every 0.5 s. The artifact footprint: the MLflow artifact folder's size, and how
much of it is not shared (hard links) with the run folders. Load averages (``os.getloadavg``) are recorded
before and after every timed command: on a shared machine read the numbers with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MACHINE = "cpu-2core"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class PeakRSS:
    """Largest total resident set of a process and its descendants (Linux /proc), sampled every 0.5 s."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            for p in self._tree():
                try:
                    for line in Path(f"/proc/{p}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) << 10
                except OSError:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``cmd``; its output to ``log``; wall time, exit status, peak memory and load before/after."""
    before = load()
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        rss = PeakRSS(proc.pid)
        rc = proc.wait()
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t0, 1), "t0": t0,
            "peak_rss_gb": round(rss.stop() / 2**30, 2), "load_before": before, "load_after": load(), "log": str(log)}


def clone(ref: str, dest: Path) -> str:
    """A clone of this repository at ``ref`` as this checkout resolves it (a worktree's HEAD is its branch's)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", "--no-checkout", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", sha], check=True)
    return subprocess.run(["git", "-C", str(dest), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def stamp_ok(checkout: Path, venv: Path) -> bool:
    """Whether ``venv`` holds the set-up stamp of ``checkout``'s pins (else quickstart.sh would install into it)."""
    import hashlib

    import re

    # the files the checkout's own setup-env.sh hashes (its `stamp_key=$(cat ... | sha256sum ...)` line)
    line = next(x for x in (checkout / "scripts" / "setup-env.sh").read_text().splitlines() if x.startswith("stamp_key="))
    names = re.search(r"cat (.*?) \|", line).group(1).split()
    key = hashlib.sha256(b"".join((checkout / n).read_bytes() for n in names)).hexdigest()[:16]
    return (venv / f".tract-setup-{key}").exists()


def cache_state() -> dict[str, Any]:
    home = Path.home() / ".cache"
    return {name: (home / name).exists() and any((home / name).iterdir())
            for name in ("pip", "uv", "tract-dist", "torch_extensions")}


def setup_env(checkout: Path, venv: Path, logs: Path, label: str) -> dict[str, Any]:
    env = dict(os.environ, TRACT_VENV=str(venv), PYTHON=os.environ.get("PYTHON", "python3"))
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(str(REPO)) and ".venv" not in p)
    caches = cache_state()
    r = timed(["bash", "scripts/setup-env.sh"], checkout, env, logs / f"setup-{label}.log")
    r["caches_before"] = caches
    r["venv_gb"] = round(sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
                         / 2**30, 2) if venv.exists() else None
    again = timed(["bash", "scripts/setup-env.sh"], checkout, env, logs / f"setup-{label}-again.log")
    r["rerun_s"] = again["wall_s"]  # the stamp: a second run does nothing
    return r


def quickstart(checkout: Path, venv: Path, logs: Path, label: str) -> dict[str, Any]:
    if not stamp_ok(checkout, venv):
        raise SystemExit(f"{venv} has no set-up stamp for {checkout}'s pins: quickstart.sh would install into it. "
                         "Use --setup (a fresh environment) or an environment set up for these pins")
    # The clone's tract_dist in the driver and every worker: the environment's editable install points at the
    # checkout that set it up (older quickstart.sh versions did not set PYTHONPATH themselves).
    env = dict(os.environ, TRACT_VENV=str(venv), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(checkout))
    env.pop("MLFLOW_TRACKING_URI", None)
    r = timed(["bash", "scripts/quickstart.sh"], checkout, env, logs / f"quickstart-{label}.log")
    r["label"] = label
    if r["rc"] != 0:
        r["tail"] = (logs / f"quickstart-{label}.log").read_text(errors="replace")[-3000:]
        return r
    pdir = next((checkout / "runs" / "pipeline").glob("*/state.json")).parent
    state = json.loads((pdir / "state.json").read_text())
    prev, stages = r["t0"], {}
    for name, rec in sorted(state["stages"].items(), key=lambda kv: kv[1]["finished_at"]):
        stages[name] = round(rec["finished_at"] - prev, 1)
        prev = rec["finished_at"]
    r["stages_s"] = stages
    r["after_last_stage_s"] = round(r["t0"] + r["wall_s"] - prev, 1)  # roll-up, results, exit
    r["train_timings_s"] = {}
    for name, rec in state["stages"].items():
        run_dir = (rec.get("outputs") or {}).get("run_dir")
        if run_dir and (Path(run_dir) / "train_result.json").exists():
            res = json.loads((Path(run_dir) / "train_result.json").read_text())
            r["train_timings_s"][name] = {**res.get("timings_s", {}), "peak_rss_gb_per_worker": round(
                res.get("peak_rss_gb", 0), 2)}
    results = json.loads((pdir / "results.json").read_text())
    r["pearson"] = {k: v["metrics"]["overall"].get("pearson") for k, v in results.items()}
    r["console_lines"] = len([x for x in (logs / f"quickstart-{label}.log").read_text(errors="replace").splitlines()
                              if x.strip()])
    r["footprint"] = footprint(checkout)
    return r


def footprint(checkout: Path) -> dict[str, float]:
    """MB under mlartifacts/, and the part of it not shared by hard links with runs/ (what a second copy costs)."""
    def files(root: Path) -> dict[tuple[int, int], int]:
        return {(st.st_dev, st.st_ino): st.st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                for st in [p.stat()]} if root.exists() else {}

    art, runs = files(checkout / "mlartifacts"), files(checkout / "runs")
    own = {k: v for k, v in art.items() if k not in runs}
    mb = 1 << 20
    return {"mlartifacts_mb": round(sum(art.values()) / mb, 1), "mlartifacts_not_in_runs_mb":
            round(sum(own.values()) / mb, 1), "runs_mb": round(sum(runs.values()) / mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="time scripts/setup-env.sh into a fresh environment first "
                                                         "(then the quickstart uses it)")
    ap.add_argument("--setup-baseline", help="also time this commit's set-up into its own fresh environment "
                                             "(before HEAD's; removed afterwards)")
    ap.add_argument("--venv", help="an existing environment for the quickstart (default: TRACT_VENV, else .venv)")
    ap.add_argument("--baseline", help="also run the quickstart of this commit, alternating with HEAD")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary clones and environment")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"quickstart-{MACHINE}"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    logs = root / "logs"
    logs.mkdir()
    report: dict[str, Any] = {"machine": MACHINE, "cpu": f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} cores", "python": platform.python_version(), "runs": [],
                              "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                     capture_output=True, text=True).stdout.strip()}
    try:
        venv = Path(args.venv or os.environ.get("TRACT_VENV") or REPO / ".venv").resolve()
        if args.setup_baseline:
            co = root / "setup-baseline-clone"
            commit = clone(args.setup_baseline, co)
            report["setup_baseline"] = {**setup_env(co, root / "venv-baseline", logs, "baseline"), "commit": commit}
            print(f"setup of {commit}: rc {report['setup_baseline']['rc']}, {report['setup_baseline']['wall_s']} s "
                  f"(load {report['setup_baseline']['load_before']} -> {report['setup_baseline']['load_after']})",
                  flush=True)
            shutil.rmtree(root / "venv-baseline", ignore_errors=True)
            shutil.rmtree(co, ignore_errors=True)
        if args.setup:
            venv = root / "venv"
            co = root / "setup-clone"
            commit = clone("HEAD", co)
            report["setup"] = {**setup_env(co, venv, logs, "head"), "commit": commit}
            print(f"setup: rc {report['setup']['rc']}, {report['setup']['wall_s']} s "
                  f"(load {report['setup']['load_before']} -> {report['setup']['load_after']})", flush=True)
            if report["setup"]["rc"] != 0:
                print((logs / "setup-head.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise SystemExit(1)
        refs = [("head", "HEAD")] + ([("baseline", args.baseline)] if args.baseline else [])
        for k in range(args.repeats):
            for label, ref in refs if k % 2 == 0 else refs[::-1]:
                co = root / f"{label}-{k}"
                commit = clone(ref, co)
                r = quickstart(co, venv, logs, f"{label}-{k}")
                r["commit"] = commit
                report["runs"].append(r)
                print(f"{label} ({commit}): rc {r['rc']}, {r['wall_s']} s (load {r['load_before']} -> "
                      f"{r['load_after']})", flush=True)
                if r["rc"] != 0:
                    print(r.get("tail", ""), file=sys.stderr)
                shutil.rmtree(co / "runs" / "pipeline", ignore_errors=True)  # GBs of checkpoints
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.out + ".md").write_text(format_report(report))
    print(format_report(report))
    if any(r["rc"] != 0 for r in report["runs"]):
        sys.exit(1)


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"# The new user's first ten minutes: set-up and the quickstart — {rep['machine']} ({rep['cpu']})", "",
             f"`benchmarks/pipeline/bench_quickstart.py` at {rep['head']}; Python {rep['python']}. Load averages "
             "(1, 5, 15 min) before -> after each command: on a shared machine the times rise with them.", ""]
    setups = [(k, rep[k]) for k in ("setup_baseline", "setup") if rep.get(k)]
    if setups:
        lines += ["## Set-up (`bash scripts/setup-env.sh` into a new environment)", "",
                  "| commit | wall | rerun (stamp) | peak memory | environment | caches before | load |",
                  "|---|---|---|---|---|---|---|"]
        for key, s in setups:
            warm = ", ".join(f"{k} {'warm' if v else 'cold'}" for k, v in s["caches_before"].items())
            lines.append(f"| {s.get('commit', '')}{' (baseline)' if key == 'setup_baseline' else ''} | "
                         f"**{s['wall_s']:.0f} s** | {s['rerun_s']:.1f} s | {s['peak_rss_gb']} GB | {s['venv_gb']} GB | "
                         f"{warm} | {s['load_before']} -> {s['load_after']} |")
        lines.append("")
    ok = [r for r in rep["runs"] if r["rc"] == 0]
    if ok:
        names = list(dict.fromkeys(n for r in ok for n in r["stages_s"]))
        lines += ["## The quickstart (`bash scripts/quickstart.sh` once the environment exists)", "",
                  "Seconds per stage (the first includes Ray's start-up), then the workers' own split of each "
                  "training stage.", "",
                  "| stage | " + " | ".join(f"{r['label']} ({r['commit']})" for r in ok) + " |",
                  "|---|" + "---|" * len(ok)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{r['stages_s'].get(n, float('nan')):.1f}" for r in ok) + " |")
        lines.append("| after the last stage (roll-up, exit) | " + " | ".join(
            f"{r['after_last_stage_s']:.1f}" for r in ok) + " |")
        lines.append("| **total (wall)** | " + " | ".join(f"**{r['wall_s']:.1f}**" for r in ok) + " |")
        lines.append("| load before -> after | " + " | ".join(f"{r['load_before']} -> {r['load_after']}"
                                                              for r in ok) + " |")
        lines.append("| peak memory (process tree) | " + " | ".join(f"{r['peak_rss_gb']} GB" for r in ok) + " |")
        lines.append("| console lines | " + " | ".join(str(r["console_lines"]) for r in ok) + " |")
        lines.append("| MLflow artifacts (not shared with runs/) | " + " | ".join(
            f"{r['footprint']['mlartifacts_mb']:.0f} MB ({r['footprint']['mlartifacts_not_in_runs_mb']:.0f} MB)"
            for r in ok) + " |")
        parts = sorted({k for r in ok for t in r["train_timings_s"].values() for k in t})
        for stage in sorted({s for r in ok for s in r["train_timings_s"]}):
            for part in parts:
                lines.append(f"| {stage}: {part} | " + " | ".join(
                    str(r["train_timings_s"].get(stage, {}).get(part, "-")) for r in ok) + " |")
        lines += ["", "Pearson per evaluation (8 held-out records; the same seeds):", ""]
        for r in ok:
            lines.append(f"- {r['label']} ({r['commit']}): " + ", ".join(
                f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in r["pearson"].items()))
        if len({r["label"] for r in ok}) == 2:
            head = [r["wall_s"] for r in ok if r["label"].startswith("head")]
            base = [r["wall_s"] for r in ok if r["label"].startswith("baseline")]
            lines += ["", f"Wall time ratio baseline / head: {sum(base) / len(base) / (sum(head) / len(head)):.2f}"]
    for r in rep["runs"]:
        if r["rc"] != 0:
            lines.append(f"- {r['label']}: failed (exit {r['rc']})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
