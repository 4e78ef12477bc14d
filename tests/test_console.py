"""The quiet console (tract_dist/console.py): a worker process's output, its subprocesses' included, goes to its
log while the project's lines reach the terminal; a quiet driver keeps library INFO lines and warnings off
the terminal and in logs/driver.log; --verbose (TRACT_DIST_VERBOSE=1) leaves everything on the terminal.
The pipeline's own console is checked in tests/test_pipeline.py::test_pipeline_runs_without_ray."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest

from tract_dist import console


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)


@pytest.fixture
def verbose(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")


def _worker_output(tmp_path, capfd):
    """What a worker process does: C-level and subprocess output, a Python print, then a console line."""
    log = tmp_path / "logs" / "train-rank0.log"
    with console.output_to(log):
        subprocess.run([sys.executable, "-c", "import sys; print('child chatter'); "
                        "print('child warning', file=sys.stderr)"], check=True)
        print("library print", file=sys.__stdout__, flush=True)  # a worker's sys.stdout is file descriptor 1
        console.line("[train] step 1/2 loss=1")
        console.error("[train] warning: on the terminal")
    return capfd.readouterr(), log


def test_worker_output_goes_to_its_log_and_console_lines_to_the_terminal(tmp_path, capfd, quiet):
    cap, log = _worker_output(tmp_path, capfd)
    assert cap.out.splitlines() == ["[train] step 1/2 loss=1"]
    assert cap.err.splitlines() == ["[train] warning: on the terminal"]
    text = log.read_text()
    for s in ("child chatter", "child warning", "library print", "[train] step 1/2 loss=1",
              "[train] warning: on the terminal"):
        assert s in text
    print("after")  # the terminal is back once the block ends
    assert capfd.readouterr().out == "after\n" and console.log_path() is None


def test_verbose_worker_output_stays_on_the_terminal(tmp_path, capfd, verbose):
    cap, log = _worker_output(tmp_path, capfd)
    assert {"child chatter", "library print", "[train] step 1/2 loss=1"} <= set(cap.out.splitlines())
    assert {"child warning", "[train] warning: on the terminal"} <= set(cap.err.splitlines())
    assert not log.exists()


def _driver_chatter() -> None:
    lib = logging.getLogger("mlflow.store.db.utils")
    lib.info("Creating initial MLflow database tables...")
    lib.warning("a real problem")
    for _ in range(3):
        warnings.warn_explicit("minimum number of concurrent actors", UserWarning, "ray/data/op.py", 551)


def test_quiet_driver_logs_library_info_and_warnings_once(tmp_path, capfd, quiet):
    import mlflow  # noqa: F401 - it installs its handlers on import

    mlflow_logger = logging.getLogger("mlflow")
    handler = logging.StreamHandler(sys.stderr)  # as mlflow's own
    mlflow_logger.addHandler(handler)
    old_level = mlflow_logger.level
    mlflow_logger.setLevel(logging.INFO)
    try:
        with console.quiet_run(tmp_path / "logs"):
            assert console.os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "1"
            _driver_chatter()
        err = capfd.readouterr().err
        assert "a real problem" in err  # warnings of the libraries' loggers stay on the terminal
        assert "Creating initial" not in err and "concurrent actors" not in err
        text = (tmp_path / "logs" / console.DRIVER_LOG).read_text()
        assert "Creating initial MLflow database tables" in text
        assert text.count("minimum number of concurrent actors") == 1
        assert handler.level == logging.NOTSET  # restored

        with pytest.MonkeyPatch.context() as m:
            m.setenv(console.VERBOSE_ENV, "1")
            with console.quiet_run(tmp_path / "logs3"):
                _driver_chatter()
        assert "Creating initial" in capfd.readouterr().err  # (pytest itself records the warnings here)
        assert not (tmp_path / "logs3").exists()
    finally:
        mlflow_logger.removeHandler(handler)
        mlflow_logger.setLevel(old_level)


def test_ray_options_follow_verbosity(monkeypatch, tmp_path, quiet):
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path))
    init, env = console.ray_init_options(local=True)
    assert init == {"logging_level": logging.WARNING}
    assert env == {"worker_process_setup_hook": console.RAY_WORKER_SETUP_HOOK}
    assert console.ray_init_options(local=False)[1] == {}  # a remote cluster's workers cannot write our folder
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.ray_init_options(local=True) == ({}, {})


def test_cli_verbose_flag_sets_the_environment(monkeypatch):
    from tract_dist.cli import build_parser

    parser = build_parser()
    for cmd in ("pipeline", "train"):
        args, _ = parser.parse_known_args([cmd, "c.yaml", "--verbose"])
        assert args.verbose is True
        assert parser.parse_known_args([cmd, "c.yaml"])[0].verbose is False
    assert parser.parse_known_args(["pipeline", "c.yaml", "-v"])[0].verbose is True


def test_quiet_run_keeps_ray_data_info_off_the_console_through_its_logging_config(tmp_path, quiet, monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    from ray.data._internal.logging import configure_logging

    def console_levels() -> list[int]:
        return [h.level for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]

    configure_logging()  # as importing ray.data does
    console.quiet_ray_data()  # outside a quiet run: nothing
    assert "RAY_DATA_LOGGING_CONFIG" not in console.os.environ and console_levels() == [logging.INFO]
    with console.quiet_run(tmp_path / "logs"):
        console.quiet_ray_data()
        assert console_levels() == [logging.ERROR]
        configure_logging()  # what Ray Data's workers do per dataset: the same file
        assert console_levels() == [logging.ERROR]
    assert "RAY_DATA_LOGGING_CONFIG" not in console.os.environ
    assert console_levels() == [logging.INFO]  # Ray Data's own default again
