"""MLflow outages never fail the work: metrics are buffered and retried, then dropped with a counted warning;
an unreachable store or a deleted run is a warning; runs end FINISHED / FAILED / KILLED; credentials in
tracking URIs are redacted from params and written files. Last, a real `mlflow server` killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import tract_dist.tracking.mlflow_run as mr
from tract_dist.tracking import STATS, flush, log_metrics, log_params, start_run

pytestmark = [pytest.mark.usefixtures("migrated_mlflow_db")]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path}/m.db"


class _Flaky:
    """A client whose writes fail while ``down`` (an outage), delegating to the real one otherwise."""

    def __init__(self, real_factory):
        self.real_factory = real_factory
        self.down = False

    def __call__(self, uri):
        real = self.real_factory(uri)
        flaky = self

        class Client:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if name in ("log_batch", "set_terminated", "log_artifact", "set_tag") and flaky.down:
                    def fail(*a, **k):
                        raise ConnectionError("tracking server unreachable (simulated)")
                    return fail
                return attr
        return Client()


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_are_buffered_through_an_outage_and_sent_after(store, monkeypatch, capsys):
    flaky = _Flaky(mr._client)
    monkeypatch.setattr(mr, "_client", flaky)
    with start_run(store, "exp", "r") as h:
        log_metrics(h, {"loss": 1.0}, step=1)
        flaky.down = True
        log_metrics(h, {"loss": 2.0}, step=2)  # fails: buffered, no exception
        log_metrics(h, {"loss": 3.0}, step=3)  # within the backoff: buffered without a request
        assert len(mr._OUTBOXES[(h.tracking_uri, h.run_id)].pending) == 2
        flaky.down = False
        log_metrics(h, {"loss": 4.0}, step=4)  # still backing off: buffered
    # the run's end flushed everything, in order
    assert _history(h.tracking_uri, h.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    err = capsys.readouterr().err
    assert "metric values are buffered and will be retried" in err


def test_metrics_dropped_with_a_counted_warning_when_the_store_stays_down(store, monkeypatch, capsys):
    flaky = _Flaky(mr._client)
    monkeypatch.setattr(mr, "_client", flaky)
    before = STATS.dropped_metrics
    with start_run(store, "exp", "r") as h:
        flaky.down = True
        for step in range(5):
            log_metrics(h, {"loss": float(step), "lr": 0.1}, step=step)
    assert STATS.dropped_metrics - before == 10
    err = capsys.readouterr().err
    assert "dropped 10 buffered metric values" in err and "ending run" in err  # set_terminated failed too


def test_unreachable_store_runs_the_body_untracked(monkeypatch, capsys):
    # The warning is rate-limited per process (the first 5 failures, then every 50th): earlier tests' failures
    # must not silence this one's.
    monkeypatch.setattr(STATS, "failed_calls", 0)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    ran = []
    with start_run(f"http://127.0.0.1:{port}", "exp", "r") as h:
        ran.append(True)
        log_metrics(h, {"loss": 1.0}, step=1)
        flush(h)
    assert ran and not h.enabled
    assert "the run goes on without it" in capsys.readouterr().err


def test_missing_or_deleted_run_id_starts_a_new_run(store, capsys):
    from mlflow.tracking import MlflowClient

    with start_run(store, "exp", "r", run_id="0123456789abcdef0123456789abcdef") as h:
        pass
    assert h.run_id != "0123456789abcdef0123456789abcdef"
    assert "no longer exists" in capsys.readouterr().err
    client = MlflowClient(h.tracking_uri)
    client.delete_run(h.run_id)
    with start_run(store, "exp", "r", run_id=h.run_id) as h2:
        pass
    assert h2.run_id != h.run_id and client.get_run(h2.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("exc,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                        (SystemExit(143), "KILLED"), (SystemExit(0), "FINISHED")])
def test_run_status_on_the_way_out(store, exc, status):
    from mlflow.tracking import MlflowClient

    with pytest.raises(type(exc)):
        with start_run(store, "exp", "r") as h:
            raise exc
    assert MlflowClient(h.tracking_uri).get_run(h.run_id).info.status == status


def test_sigterm_ends_the_command_killed(tmp_path):
    """``tract-dist`` turns SIGTERM (``ray job stop``, a scheduler) into an unwinding exit: the run is KILLED."""
    script = (
        "import sys, time\n"
        "from tract_dist.cli import main, _on_sigterm\n"
        "import signal\n"
        "from tract_dist.tracking import start_run\n"
        "signal.signal(signal.SIGTERM, _on_sigterm)\n"
        f"with start_run('sqlite:///{tmp_path}/m.db', 'exp', 'r') as h:\n"
        "    print(h.run_id, flush=True)\n"
        "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{tmp_path}/m.db").get_run(run_id).info.status == "KILLED"


def test_credentials_are_redacted_from_params_and_written_files(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tract_dist.tracking import redact_text

    secret_uri = "https://alice:s3cr3t@mlflow.example.com/?token=abc123&x=1"
    assert redact_text(secret_uri) == "https://***@mlflow.example.com/?token=***&x=1"
    with start_run(store, "exp", "r") as h:
        log_params(h, {"tracking.tracking_uri": secret_uri})
    got = MlflowClient(h.tracking_uri).get_run(h.run_id).data.params["tracking.tracking_uri"]
    assert "s3cr3t" not in got and "abc123" not in got

    # torchrun's loop.json carries no credential; the workers get the URI in their environment
    import tract_dist.train.trainer as trainer
    from tract_dist.config import load_config
    from tract_dist.train.plan import WorkerPlan

    seen = {}

    def fake_run(cmd, env, **kwargs):  # stdout/stderr: the terminal when the driver is quiet
        seen["env"] = env
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(trainer.subprocess, "run", fake_run)
    cfg = load_config(None, [f"tracking.tracking_uri={secret_uri}"], base={"model": {"name_or_path": "tiny-llama"}})
    loop = WorkerPlan(config=cfg.model_dump(), run_dir=str(tmp_path), tracking_uri=secret_uri, run_id="r")
    trainer._fit_with_torchrun(cfg, loop, tmp_path)
    written = (tmp_path / "loop.json").read_text()
    assert "s3cr3t" not in written and "abc123" not in written and "***@mlflow.example.com" in written
    assert seen["env"]["TRACT_DIST_WORKER_TRACKING_URI"] == secret_uri


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_server_killed_mid_run_does_not_fail_training(tmp_path, quickstart_data, mlflow_server, monkeypatch,
                                                            capsys):
    import tract_dist.train.recipe as recipe
    from tract_dist.config import load_config
    from tract_dist.train.trainer import run_training

    uri, proc = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_log = recipe.log_metrics

    def kill_server_at_step_2(handle, metrics, step=None):
        if step == 2 and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        real_log(handle, metrics, step=step)

    monkeypatch.setattr(recipe, "log_metrics", kill_server_at_step_2)
    base = {"model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
            "data": {"train_path": str(quickstart_data), "train_format": "jsonl", "max_length": 512,
                     "max_examples": 4},
            "training": {"output_dir": str(tmp_path / "runs"), "max_steps": 4, "save_steps": 100},
            "tracking": {"tracking_uri": uri, "experiment": "outage"}}
    before = STATS.dropped_metrics
    r = run_training(load_config(None, base=base), run_name="outage", launcher="inline")
    assert json.loads((r.run_dir / "train_result.json").read_text())["steps"] == 4
    assert len((r.run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # the local record is whole
    assert STATS.dropped_metrics - before >= 3 * 9  # steps 2-4 never reached the dead server, counted
    assert "dropped" in capsys.readouterr().err
