"""Shared fixtures: the real benchmark data (the committed quickstart sample, and the full sets beside the
checkout), and offline tokenizers."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ray_token_for_the_session() -> None:
    """Ray token authentication stays on for the whole suite: every Ray it starts (the local ``ray.init``, the
    ``ray start --head`` of the Jobs tests, their clients, subprocesses) uses one token made for this session,
    kept in a temporary file, so the suite never writes ``~/.ray/auth_token``. RAY_AUTH_MODE is set to token
    explicitly (Ray 2.60's default for a local ``ray.init``; ``ray start`` needs it said), overriding a
    ``disabled`` left in the caller's environment."""
    folder = Path(tempfile.mkdtemp(prefix="tract-ray-auth-"))
    atexit.register(shutil.rmtree, folder, True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})


_ray_token_for_the_session()
# 16 Vicuna Bench records converted to the project's JSONL, committed (data/quickstart/NOTICE).
QUICKSTART_DATA = REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema migrations applied, made once per session."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def migrated_mlflow_db(tmp_path, _mlflow_template_db) -> str:
    """``tmp_path/mlflow.db`` (where the tracking tests' configs point) as a freshly migrated, empty store; its
    URI. MLflow's schema migrations cost 2.4 s per new sqlite store on cpu-2core, paid by about 30 tests; a
    copy of the migrated file is the same empty store. Modules that track ask for it with
    ``pytest.mark.usefixtures("migrated_mlflow_db")``."""
    target = tmp_path / "mlflow.db"
    if not target.exists():
        shutil.copyfile(_mlflow_template_db, target)
    return f"sqlite:///{target}"


def shared_data_dir() -> Path:
    return Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def vicuna_path() -> Path:
    """The full Vicuna Bench judge set (320 records, never committed); skipped when absent, except under
    CI=true where it must exist. Tests that need only a few records use ``quickstart_data`` instead."""
    p = shared_data_dir() / "prometheus-eval" / "vicuna_eval.json"
    if not p.is_file():
        hint = "set TRACT_SHARED_DATA to the folder that holds prometheus-eval/vicuna_eval.json"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{p} is missing ({hint})")
        pytest.skip(f"{p} is absent ({hint})")
    return p


@pytest.fixture(scope="session")
def quickstart_data() -> Path:
    """The committed 16-record Vicuna Bench sample (records 0-15 of vicuna_eval.json, ids "0".."15", JSONL):
    real data for tests that need only a few records, so they run in any clone. Never skipped: it is part of
    the repository."""
    assert QUICKSTART_DATA.is_file(), f"{QUICKSTART_DATA} is missing from the checkout"
    return QUICKSTART_DATA


@pytest.fixture(scope="session")
def quickstart_examples(quickstart_data):
    """The sample's 16 examples as every reader returns them (feedback present, not required)."""
    from tract_dist.data.formats import read_examples

    return read_examples(str(quickstart_data), "jsonl", require_feedback=False).examples


class _Tokenizers(dict):
    """The offline aliases' tokenizers, each loaded on first use (a few seconds each on the 2-core machine)."""

    def __missing__(self, name):
        from tract_dist.aliases import TOKENIZER_ALIASES
        from tract_dist.data.assets import load_tokenizer

        if name not in TOKENIZER_ALIASES:
            raise KeyError(name)
        self[name] = load_tokenizer(name)
        return self[name]


@pytest.fixture(scope="session")
def tokenizers():
    return _Tokenizers()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole suite, sized for a 2-core machine (logical CPUs; see STACK-NOTES)."""
    import ray

    from tract_dist.runtime.ray_cluster import init_ray

    init_ray(None, num_cpus=4, log_to_driver=False,
             env_vars={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                       "TOKENIZERS_PARALLELISM": "false"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    """A stage-1-export-shaped HF folder: tiny deterministic Llama + SmolLM2's tokenizer and chat template.
    Built once for the session; tests only read it (those that change a model copy it first)."""
    from tract_dist.generate.tiny_export import save_tiny_export

    return str(save_tiny_export(tmp_path_factory.mktemp("tiny_export") / "model", "smollm2"))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M (the ``smollm2`` alias) as a local HF folder."""
    from tract_dist.models.loading import materialize_alias

    return materialize_alias("smollm2")


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a test: on a shared 2-core machine, two OpenMP threads spin-waiting on a busy core
    made tiny-model generation 5-10x slower at random (see the generation benchmark); the Ray replicas get their
    own thread counts. The packages whose tests generate in-process make it autouse in their conftest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free loopback port with a sqlite store under ``tmp_path``; yields
    ``(uri, process)`` (a test may kill the process itself) and stops it afterwards."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--default-artifact-root", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                MlflowClient(uri).search_experiments()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not come up")
                time.sleep(0.5)
        yield uri, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


@pytest.fixture
def lock_holder():
    """``with lock_holder(folder, what) as pid:`` another process holds ``folder``'s exclusive lock (what a second
    invocation meets) until the block ends."""
    import contextlib
    import subprocess
    import sys

    script = ("import sys, time\nfrom tract_dist.fsutil import exclusive_lock\n"
              "with exclusive_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(60)\n")

    @contextlib.contextmanager
    def hold(folder, what):
        proc = subprocess.Popen([sys.executable, "-c", script, str(folder), what], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "held"
            yield proc.pid
        finally:
            proc.kill()
            proc.wait()

    return hold


@pytest.fixture(autouse=True)
def _no_leftover_zero3_context():
    """A test starts without another test's ZeRO-3 context: transformers keeps the last live HfDeepSpeedConfig in a
    module global, and while anything (a cached engine, a model) holds it, every model built afterwards in this
    process is born partitioned (empty weights on one rank). Tests that want ZeRO-3 build their own."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    yield


@pytest.fixture(autouse=True)
def _console_attached():
    """Each test stands where an entry point stands (``tract-dist``'s main attaches the same handler): the
    library's console lines, which it logs, reach the terminal that capsys / capfd read."""
    from tract_dist import console

    with console.attached():
        yield
