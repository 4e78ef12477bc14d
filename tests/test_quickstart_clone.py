"""The quickstart's data path from a copy of the repository with nothing beside it (no ../shared, and
TRACT_SHARED_DATA naming a folder that does not exist), as a new user's clone is.

The copy holds what a clone would (the files git tracks, plus this working tree's untracked files that are
not ignored, so uncommitted work is tested too; virtual environments excluded). From that copy, in fresh
processes that import the copy's tract_dist, the config is shown as the CLI shows it and the training and
benchmark data are resolved and read by the pipeline's own functions. No training runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT, CONFIG = "scripts/quickstart.sh", "configs/quickstart.yaml"

# Run inside the copy: exactly what run_pipeline does with the quickstart config before and while its stages
# read data (preflight, the data-file check, stage 1's encoding, generation's prompts, each benchmark).
PROBE = r"""
import json, sys
import tract_dist
from tract_dist.config import load_config
from tract_dist.data.assets import load_tokenizer
from tract_dist.data.score_tokens import parse_scale
from tract_dist.evaluate.runner import load_benchmark
from tract_dist.generate.pipeline import load_training_examples
from tract_dist.identity import file_fingerprint
from tract_dist.pipeline.inputs import check_data_files
from tract_dist.train.preflight import preflight
from tract_dist.train.data import prepare_dataset

cfg = load_config(sys.argv[1])
preflight(cfg)
files = check_data_files(cfg)
train = load_training_examples(cfg.data)
bench = {b.name: [[e.id, e.score] for e in load_benchmark(b, parse_scale(cfg.data.scale))]
         for b in cfg.evaluation.benchmarks}
enc = prepare_dataset(cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path), sys.argv[2])
print(json.dumps({"package": tract_dist.__file__, "files": files, "train": [[e.id, e.score] for e in train],
                  "bench": bench, "encoded": enc["encode_encoded"], "dropped": enc["encode_dropped"],
                  "data_fp": file_fingerprint(cfg.data.train_path)}))
"""


def _clone_files() -> list[Path]:
    """Paths (relative) a clone of this working tree would have: tracked files that exist, and untracked,
    not-ignored files; whole untracked folders are expanded, except virtual environments."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot tell which files a clone would have")

    def ls(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=REPO, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]

    files = [Path(p) for p in ls("--cached") if (REPO / p).is_file()]
    for p in ls("--others", "--exclude-standard", "--directory", "--no-empty-directory"):
        src = REPO / p
        if src.is_dir():
            if (src / "pyvenv.cfg").exists():
                continue  # someone's virtual environment, not project files
            files += [f.relative_to(REPO) for f in src.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        elif src.is_file():
            files.append(Path(p))
    return files


@pytest.fixture(scope="module")
def lonely_clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lonely")
    dst = root / "tract-dist"
    for rel in _clone_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst / rel)
    assert not (dst.parent / "shared").exists() and not (dst / ".venv").exists()
    return dst


def _env(clone: Path) -> dict[str, str]:
    env = {**os.environ, "TRACT_SHARED_DATA": str(clone.parent / "no-shared-data-here"),
           "PYTHONPATH": str(clone), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CI", None)
    return env


def test_script_and_config_need_nothing_beside_the_checkout():
    for rel in (SCRIPT, CONFIG):
        text = (REPO / rel).read_text(encoding="utf-8")
        assert "../shared" not in text and "TRACT_SHARED_DATA" not in text, rel
    # The script passes no data override of its own: what the config says is what runs.
    cmd = [x for x in (REPO / SCRIPT).read_text().splitlines() if x.startswith("exec ")]
    assert cmd == ['exec python -m tract_dist.cli pipeline configs/quickstart.yaml "$@"']


@pytest.mark.timeout(240)
def test_quickstart_data_resolves_and_reads_in_a_lonely_clone(lonely_clone, tmp_path):
    env = _env(lonely_clone)
    shown = subprocess.run([sys.executable, "-m", "tract_dist.cli", "config", "show", CONFIG], cwd=lonely_clone,
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "../shared" not in shown.stdout and str(REPO) not in shown.stdout
    cfg = yaml.safe_load(shown.stdout)
    paths = [cfg["data"]["train_path"]] + [b["path"] for b in cfg["evaluation"]["benchmarks"]]
    assert all(not Path(p).is_absolute() and (lonely_clone / p).is_file() for p in paths), paths

    probe = subprocess.run([sys.executable, "-c", PROBE, CONFIG, str(tmp_path / "encoded")], cwd=lonely_clone,
                           env=env, capture_output=True, text=True, timeout=200)
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).resolve().is_relative_to(lonely_clone.resolve())  # the copy's code ran
    assert got["files"] and all(Path(p).is_relative_to(lonely_clone.resolve()) for p in got["files"].values())

    # Independent reference: the sample's own lines, parsed as plain JSON (records 0-7 train, 8-15 evaluate).
    lines = [json.loads(x) for x in (lonely_clone / paths[0]).read_text(encoding="utf-8").splitlines()]
    assert got["train"] == [[r["id"], r["score"]] for r in lines[:8]]
    assert got["bench"] == {"vicuna": [[r["id"], r["score"]] for r in lines[8:16]]}
    assert got["encoded"] == 8 and got["dropped"] == 0
    # Stage fingerprints hash the data file's content (file_fingerprint falls back to the path string for a
    # missing file), and the config holds only relative paths: the same pipeline name wherever a clone lives.
    from tract_dist.identity import file_fingerprint

    assert got["data_fp"] == file_fingerprint(str(REPO / paths[0])) != paths[0]


@pytest.mark.timeout(120)
def test_a_missing_data_file_stops_the_pipeline_before_any_stage(lonely_clone):
    """The quickstart's pipeline in the clone, with its benchmark pointed at a file that is not there: exit 2,
    the config key and the working directory named, nothing started or written."""
    override = "evaluation.benchmarks=[{name: vicuna, path: data/quickstart/absent.jsonl, format: jsonl}]"
    r = subprocess.run([sys.executable, "-m", "tract_dist.cli", "pipeline", CONFIG, override], cwd=lonely_clone,
                       env=_env(lonely_clone), capture_output=True, text=True, timeout=100)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"evaluation.benchmarks[0].path: 'data/quickstart/absent.jsonl' does not exist (relative to the "
            f"working directory {lonely_clone}") in r.stderr
    assert not (lonely_clone / "runs").exists() and not (lonely_clone / "mlflow.db").exists()


def test_check_data_files_names_the_key_and_skips_hub_sets(quickstart_data, tmp_path, monkeypatch):
    from tract_dist.config import ConfigError, load_config
    from tract_dist.pipeline.inputs import check_data_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    base = {"model": {"name_or_path": "tiny-llama"}, "data": {"train_path": str(quickstart_data)},
            "evaluation": {"benchmarks": [{"name": "hub", "path": "hf:org/set"},
                                          {"name": "local", "path": "d/x.jsonl", "format": "jsonl"}]}}
    with pytest.raises(ConfigError, match=r"evaluation.benchmarks\[1\].path: 'd/x.jsonl' does not exist "
                                          rf"\(relative to the working directory {tmp_path}\)"):
        check_data_files(load_config(None, base=base))
    (tmp_path / "d" / "x.jsonl").write_text("{}\n")
    assert check_data_files(load_config(None, base=base)) == {
        "data.train_path": str(quickstart_data.resolve()),
        "evaluation.benchmarks[1].path": str(tmp_path / "d" / "x.jsonl")}
    with pytest.raises(ConfigError, match=r"data.train_path: '.*d' is not a file$"):
        check_data_files(load_config(None, ["data.train_path=" + str(tmp_path / "d")], base=base))


@pytest.mark.timeout(180)
def test_suite_in_a_lonely_clone_skips_full_set_tests_naming_the_variable(lonely_clone):
    """What `bash scripts/test.sh` does there, on one test of each kind: the committed sample's test passes,
    the full-set test skips naming TRACT_SHARED_DATA, and under CI=true the missing set is an error."""
    tests = ["tests/data/test_quickstart_data.py::test_sample_contract_without_the_full_file",
             "tests/data/test_vicuna.py::test_all_records_parse_and_labels_are_means"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=lonely_clone, env=_env(lonely_clone), capture_output=True, text=True, timeout=80)
    assert r.returncode == 0 and "1 passed, 1 skipped" in r.stdout, r.stdout[-3000:]
    skip = next(x for x in r.stdout.splitlines() if x.startswith("SKIPPED"))
    assert "no-shared-data-here/prometheus-eval/vicuna_eval.json is absent" in skip and "TRACT_SHARED_DATA" in skip
    r = subprocess.run(cmd, cwd=lonely_clone, env={**_env(lonely_clone), "CI": "true"}, capture_output=True,
                       text=True, timeout=80)
    assert r.returncode == 1 and "1 passed, 1 error" in r.stdout, r.stdout[-3000:]
    assert "vicuna_eval.json is missing (set TRACT_SHARED_DATA" in r.stdout
