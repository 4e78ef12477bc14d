"""The quiet console (tract_dist/console.py): a worker process's output, its subprocesses' included, goes to its
log while the project's lines reach the terminal; a quiet driver keeps library INFO lines and warnings off
the terminal and in logs/driver.log; --verbose (TRACT_DIST_VERBOSE=1) leaves everything on the terminal.
The pipeline's own console is checked in tests/test_pipeline.py::test_pipeline_runs_without_ray."""

from __future__ import annotations

import logging
import logging.config
import subprocess
import sys
import warnings

import pytest

from tract_dist import console
from tract_dist.runtime import ray_logging


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
    init, env = ray_logging.init_options(local=True)
    assert init == {"logging_level": logging.WARNING}
    assert env == {"worker_process_setup_hook": ray_logging.RAY_WORKER_SETUP_HOOK}
    assert ray_logging.init_options(local=False)[1] == {}  # a remote cluster's workers cannot write our folder
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert ray_logging.init_options(local=True) == ({}, {})


def test_cli_verbose_flag_sets_the_environment(monkeypatch, tmp_path, capsys):
    """Each command's --verbose reaches the environment Ray workers and subprocesses inherit, through the CLI's
    own entry point (the run then fails fast on a missing config: exit 2, after the flag took effect)."""
    from tract_dist.cli import main

    missing = str(tmp_path / "no-such.yaml")
    for cmd in ("pipeline", "train", "generate", "evaluate", "serve", "judge"):
        monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
        assert main([cmd, missing]) == 2
        assert console.VERBOSE_ENV not in console.os.environ, cmd
        for flag in ("--verbose", "-v"):
            monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
            assert main([cmd, missing, flag]) == 2
            assert console.os.environ.get(console.VERBOSE_ENV) == "1", (cmd, flag)
    assert "no-such.yaml" in capsys.readouterr().err


def test_quiet_run_keeps_ray_data_info_off_the_console_through_its_logging_config(tmp_path, quiet, monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    from ray.data._internal.logging import configure_logging

    def console_levels() -> list[int]:
        return [h.level for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]

    configure_logging()  # as importing ray.data does
    ray_logging.quiet_ray_data()  # outside a quiet run: nothing
    assert "RAY_DATA_LOGGING_CONFIG" not in console.os.environ and console_levels() == [logging.INFO]
    with console.quiet_run(tmp_path / "logs"):
        ray_logging.quiet_ray_data()
        assert console_levels() == [logging.ERROR]
        configure_logging()  # what Ray Data's workers do per dataset: the same file
        assert console_levels() == [logging.ERROR]
    assert "RAY_DATA_LOGGING_CONFIG" not in console.os.environ
    assert console_levels() == [logging.INFO]  # Ray Data's own default again


def test_quiet_driver_sends_c_level_and_child_output_to_its_log(tmp_path, capfd, quiet):
    """A quiet driver's file descriptors 1 and 2 are its log (Ray's core worker, C++ libraries and the processes
    it starts, such as vLLM's engine core, write there), while Python's sys.stdout/sys.stderr, and so the
    project's lines, progress bars, Ray's forwarded worker lines and the libraries' console handlers, stay on the
    terminal (#23: core_worker.cc errors, vLLM and Triton lines reached the console)."""
    import os

    lib = logging.getLogger("ray.data")  # a library handler made before the run, on the original stderr
    handler = logging.StreamHandler(sys.__stderr__)
    lib.addHandler(handler)
    try:
        with console.quiet_run(tmp_path / "logs"):
            os.write(2, b"[2026-12-07 04:31:35,876 E 5144 5144] core_worker.cc:2465: Actor with class name\n")
            subprocess.run([sys.executable, "-c", "import sys; print('engine core INFO'); "
                            "print('FutureWarning: triton', file=sys.stderr)"], check=True)
            print("[pipeline] train_stage1: running")
            print("generate: 50%|#####", file=sys.stderr)
            console.line("[train] step 1/3")
            lib.error("a real problem")
            assert console.terminal_fds()[0] is not None
        assert console.terminal_fds() == (None, None)
        cap = capfd.readouterr()
        assert cap.out.splitlines() == ["[pipeline] train_stage1: running", "[train] step 1/3"]
        assert cap.err.splitlines() == ["generate: 50%|#####", "a real problem"]
        log = (tmp_path / "logs" / console.DRIVER_LOG).read_text()
        for chatter in ("core_worker.cc", "engine core INFO", "FutureWarning: triton"):
            assert chatter in log
        assert handler.stream is sys.__stderr__  # restored
        print("after")
        assert capfd.readouterr().out == "after\n"
    finally:
        lib.removeHandler(handler)


def test_ray_token_notice_and_vllm_lines_go_to_the_log(tmp_path, capfd, quiet, monkeypatch):
    """Ray's "Token authentication is enabled" WARNING (token auth stays on by design) and everything vLLM logs
    below ERROR, in this process and the processes it starts (its engine core), go to the run's logs."""
    import json

    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)
    ray_logger = logging.getLogger("ray")
    ray_handler = logging.StreamHandler(sys.stderr)  # as Ray's own console handler
    ray_logger.addHandler(ray_handler)
    vllm = logging.getLogger("vllm")
    vllm_before = list(vllm.handlers), vllm.propagate, vllm.level
    try:
        with console.quiet_run(tmp_path / "logs"):
            logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
                "Token authentication is enabled for this Ray cluster.")
            logging.getLogger("ray.train").warning("a Ray warning worth seeing")
            config = console.os.environ["VLLM_LOGGING_CONFIG_PATH"]
            # vLLM reads the config when imported: in a process the run starts (its engine core) ...
            subprocess.run([sys.executable, "-c", "import json, logging.config, os; logging.config.dictConfig(json.load("
                            "open(os.environ['VLLM_LOGGING_CONFIG_PATH']))); log = logging.getLogger('vllm.engine'); "
                            "log.info('Initializing a V1 LLM engine'); log.warning('Triton is installed, but does not "
                            "include CPU backend'); log.error('engine core died')"], check=True)
            # ... and in the driver, where errors still reach the terminal
            logging.config.dictConfig(json.loads(open(config).read()))
            logging.getLogger("vllm.config").warning("Casting torch.bfloat16 to torch.float32")
            logging.getLogger("vllm.llm").error("vLLM failed in the driver")
        err = capfd.readouterr().err
        assert "Token authentication" not in err and "a Ray warning worth seeing" in err
        assert "vLLM failed in the driver" in err
        for chatter in ("Initializing", "Triton", "engine core died", "Casting"):
            assert chatter not in err
        logs = tmp_path / "logs"
        assert "Token authentication is enabled" in (logs / console.DRIVER_LOG).read_text()
        vllm_log = (logs / console.VLLM_LOG).read_text()
        for line in ("Initializing a V1 LLM engine", "Triton is installed", "engine core died", "Casting"):
            assert line in vllm_log
        assert json.loads(open(config).read())["loggers"]["vllm"]["propagate"] is False
        assert "VLLM_LOGGING_CONFIG_PATH" not in console.os.environ  # unset again after the run
        assert not logging.getLogger(
            "ray._private.authentication.authentication_token_setup").handlers  # restored
    finally:
        ray_logger.removeHandler(ray_handler)
        for h in [h for h in vllm.handlers if h not in vllm_before[0]]:  # the config applied in this process
            vllm.removeHandler(h)
            h.close()
        vllm.propagate, vllm.level = vllm_before[1], vllm_before[2]


def test_ray_forwards_worker_lines_without_the_pid_prefix_when_quiet(quiet, monkeypatch):
    """The (pid=...) prefix Ray puts on the workers' lines it prints in the driver (only the project's console
    lines reach it in a quiet run) is off for a quiet run's ray.init, on again afterwards and under --verbose."""
    from ray._private import ray_constants
    from ray._private.worker import _should_ignore_worker_log_prefix

    class Worker:
        job_logging_config = None

    before = ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX
    with ray_logging.worker_lines_unprefixed():
        assert _should_ignore_worker_log_prefix(Worker()) is True
    assert ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX == before
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with ray_logging.worker_lines_unprefixed():
        assert ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX == before


def test_quiet_runs_nest_into_the_outer_one(tmp_path, quiet):
    """A pipeline's stages (train, generate, evaluate) keep the pipeline's logs/ rather than opening their own."""
    with console.quiet_run(tmp_path / "outer"):
        with console.quiet_run(tmp_path / "inner"):
            assert console.os.environ[console.LOG_DIR_ENV] == str(tmp_path / "outer")
    assert not (tmp_path / "inner").exists()


def test_handlers_a_library_adds_during_the_run_are_quieted_too(tmp_path, capfd, quiet):
    """Ray Serve sets up its driver logger when it starts, after the run began (#23: "Started Serve",
    "Application ... is ready" on the serve console)."""
    serve_logger = logging.getLogger("ray.serve")
    handler = logging.StreamHandler(sys.stderr)
    old_level = serve_logger.level
    serve_logger.setLevel(logging.INFO)
    try:
        with console.quiet_run(tmp_path / "logs"):
            serve_logger.addHandler(handler)  # as serve.start does
            console.quiet_new_loggers()
            serve_logger.info('Started Serve in namespace "serve".')
            serve_logger.warning("a replica died")
        err = capfd.readouterr().err
        assert "a replica died" in err and "Started Serve" not in err
        assert "Started Serve" in (tmp_path / "logs" / console.DRIVER_LOG).read_text()
        assert handler.level == logging.NOTSET
        console.quiet_new_loggers()  # outside a run: nothing to do
    finally:
        serve_logger.removeHandler(handler)
        serve_logger.setLevel(old_level)


def test_library_lines_reach_the_terminal_only_through_an_entry_points_handler(capsys, monkeypatch):
    """Library code logs; ``console.attach`` (what ``tract-dist`` and each worker's entry point call) writes the
    records marked as console lines, unchanged, where the print or console call they replace wrote (#30); other
    records go where they went before: to the root's handlers at the root's level, else (no handler at all) a
    warning to stderr as Python's last resort showed it."""
    lib = logging.getLogger("tract_dist.some.module")
    pkg = logging.getLogger(console.PACKAGE_LOGGER)
    root = logging.getLogger()
    monkeypatch.setattr(pkg, "handlers", [])  # this test's own entry point (the autouse fixture's) taken away
    monkeypatch.setattr(pkg, "propagate", True)
    pkg.setLevel(logging.NOTSET)  # as a process starts (the fixture puts its level back afterwards)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    monkeypatch.setattr(root, "handlers", [Keep()])
    monkeypatch.setattr(root, "level", logging.WARNING)
    lib.info("[x] line", extra=console.CONSOLE)
    assert capsys.readouterr() == ("", "") and seen == []  # a library on its own is silent
    with console.attached():
        lib.info("[x] line", extra=console.CONSOLE)
        lib.info("[x] error line", extra=console.CONSOLE_ERR)
        lib.info("[x] terminal line", extra=console.TERMINAL)
        lib.error("[x] terminal error", extra=console.TERMINAL_ERR)
        lib.info("library chatter")  # below the root's level: dropped, as before
        lib.warning("a library warning")  # to the root's handlers, as before
        monkeypatch.setattr(root, "handlers", [])
        lib.warning("no handler anywhere")
    cap = capsys.readouterr()
    assert cap.out == "[x] line\n[x] terminal line\n"
    assert cap.err == "[x] error line\n[x] terminal error\nno handler anywhere\n"
    assert seen == ["a library warning"]  # the console lines went to the terminal only
    assert pkg.handlers == [] and pkg.propagate and pkg.level == logging.NOTSET  # attached() put it back
