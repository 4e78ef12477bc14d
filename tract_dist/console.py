"""What a run prints on the terminal, and where everything else goes.

Without ``--verbose`` a run (pipeline, train, generate, evaluate, serve) prints its own lines only: a line per
stage (started, finished in N s, failed with the path of the full log), progress (training's step lines every
``training.logging_steps``, generation's and evaluation's one updating bar) and the summary table. The
libraries' chatter goes to the run folder's ``logs/``: worker processes (Ray workers, torchrun ranks) write
their whole stdout/stderr there, keeping only the project's console lines on the terminal (forwarded by Ray
without its ``(pid=...)`` prefix); the driver's own file descriptors 1 and 2 go to ``logs/driver.log`` too
(Ray's core worker, C++ libraries, and processes it starts, such as vLLM's engine core), while Python's
``sys.stdout`` / ``sys.stderr`` stay on the terminal; there the library loggers (Ray, Ray Data, Ray Serve,
MLflow, DeepSpeed, transformers, datasets; vLLM below ERROR) print warnings only, their progress bars are off,
notices of choices the project made on purpose (Ray's token authentication) and Python warnings of libraries
are logged to ``logs/driver.log`` once each, and vLLM logs to ``logs/vllm.log`` in every process (its
``VLLM_LOGGING_CONFIG_PATH``). Ray's own session logs stay under Ray's temporary folder (named once on the
console). Errors are never hidden: they reach the terminal, with the log's path.

``--verbose`` (``TRACT_DIST_VERBOSE=1``, inherited by Ray workers and subprocesses) leaves every library as it
is: today's full output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from tract_dist.envvars import temporary_env

VERBOSE_ENV = "TRACT_DIST_VERBOSE"
LOG_DIR_ENV = "TRACT_DIST_LOG_DIR"  # the run folder's logs/, for Ray workers started while it is set
DRIVER_LOG = "driver.log"
RAY_WORKERS_LOG = "ray-workers.log"

# Read by the libraries when they are imported or called, so processes started later (Ray workers, torchrun
# ranks) are quiet too; a value the user set wins.
_QUIET_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "1",  # "View run ... at" per run (the table names the parent run)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Saving the dataset (1/1 shards)" per training stage
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers follows it: "Loading weights", GGUF de-quantising
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars of the pipeline's roll-up
}
# Loggers whose INFO lines are chatter on a terminal; their console handlers are raised to WARNING (vLLM's to
# ERROR: its start-up warnings, dozens on a CPU, are about its own configuration, not the user's run).
_LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic", "DeepSpeed",
                    "transformers", "datasets", "torch.distributed", "filelock", "urllib3", "vllm")
_CONSOLE_LEVELS = {"vllm": logging.ERROR}
# Warnings that describe what the project chose on purpose, not a problem of the run: to the log only. Ray's
# "Token authentication is enabled" notice is printed by every local ray.init (token auth stays on, README).
_NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
VLLM_LOG = "vllm.log"

_console_fd: int | None = None  # the terminal's stdout, when this process's own stdout/stderr go to a log file
_console_err_fd: int | None = None  # and its stderr
_log_path: Path | None = None


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """``--verbose``: through the environment, so that Ray workers and subprocesses see it too."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


# Library code logs (``logging.getLogger(__name__)``); only the entry points own the terminal. A record meant for
# the user carries one of these as ``extra``; the entry point of each process (the command line, a worker's entry
# function, a Ray actor's constructor) calls :func:`attach` once, which writes those lines, as they are, to:
CONSOLE = {"console": "out"}  # this process's stdout (a driver's: the terminal)
CONSOLE_ERR = {"console": "err"}  # this process's stderr
TERMINAL = {"console": "terminal"}  # the terminal's stdout, also from a worker whose output goes to a log (line)
TERMINAL_ERR = {"console": "terminal-err"}  # the terminal's stderr, likewise (error)
PACKAGE_LOGGER = "tract_dist"


class ConsoleHandler(logging.Handler):
    """The package logger's one handler while an entry point owns the terminal: the project's console lines
    (records with ``extra=CONSOLE`` / ``CONSOLE_ERR`` / ``TERMINAL`` / ``TERMINAL_ERR``) written as they are (no
    level or logger name), and nowhere else; every other record goes on to the root logger's handlers as if it
    had propagated, at the level it would have had (so warnings reach whatever showed them before)."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor  # the package logger's own level before attach (NOTSET: follow the root's)

    def emit(self, record: logging.LogRecord) -> None:
        where = getattr(record, "console", None)
        if where is None:
            root = logging.getLogger()
            if record.levelno >= (self.floor or root.level):
                root.handle(record)
            return
        try:
            msg = record.getMessage()
            if where in ("terminal", "terminal-err"):
                (error if where == "terminal-err" else line)(msg)
            else:
                stream = sys.stderr if where == "err" else sys.stdout
                stream.write(msg + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises into the caller
            self.handleError(record)


def attach() -> None:
    """Entry points: the package's console lines on this process's terminal from now on (idempotent)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        return
    logger.addHandler(ConsoleHandler(logger.level))
    logger.setLevel(logging.INFO)  # the console lines are INFO; the root's WARNING would drop them
    logger.propagate = False  # ConsoleHandler hands the other records to the root itself


@contextlib.contextmanager
def attached() -> Iterator[None]:
    """:func:`attach` for a block (tests, a script that calls the library), then the logger as it was."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    attach()
    try:
        yield
    finally:
        for h in logger.handlers[:]:
            if h not in handlers:
                logger.removeHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate


def line(msg: str) -> None:
    """One console line of the project: on the terminal, and in the log when output is redirected.

    ``write``, not ``print``: Ray Train V2's patched ``print`` echoes every line twice."""
    _emit(msg, sys.stdout, 1, _console_fd)


def error(msg: str) -> None:
    """An error or warning line: on the terminal's stderr (also while this process's output goes to a log)."""
    _emit(msg, sys.stderr, 2, _console_err_fd)


def _emit(msg: str, stream: Any, fd: int, terminal: int | None) -> None:
    if terminal is None:  # not redirected: through the stream (which tests' capsys sees)
        stream.write(msg + "\n")
        stream.flush()
        return
    data = (msg + "\n").encode("utf-8", "replace")
    stream.flush()
    os.write(fd, data)  # the log
    os.write(terminal, data)


def log_path() -> Path | None:
    """The file this process's output goes to, if it is redirected."""
    return _log_path


def _point_std_at(path: Path) -> None:
    """File descriptors 1 and 2 append to ``path`` from now on (the log this process's output goes to)."""
    global _log_path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log_path = path


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2: C++ and subprocess output too) append to
    ``path``; :func:`line` and :func:`error` still reach the terminal. For worker processes (torchrun ranks, Ray
    workers), never a driver (a driver's tracebacks must stay on the terminal). No-op under ``--verbose``."""
    global _console_fd, _console_err_fd, _log_path
    if is_verbose():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    previous = _console_fd, _console_err_fd, _log_path
    if _console_fd is None:
        _console_fd, _console_err_fd = os.dup(1), os.dup(2)
    _point_std_at(path)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        if previous[0] is None:
            for fd in (_console_fd, _console_err_fd):
                if fd is not None:
                    os.close(fd)
        _console_fd, _console_err_fd, _log_path = previous


def setup_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` of a local cluster started by a quiet run: every Ray worker process
    (Ray Train's controller and workers, Ray Data's actors) writes its output to the run folder's
    ``logs/ray-workers.log``; the project's console lines still reach the driver (``log_to_driver``)."""
    global _console_fd, _console_err_fd
    attach()
    log_dir = os.environ.get(LOG_DIR_ENV)
    if is_verbose() or not log_dir or _console_fd is not None:
        return
    path = Path(log_dir) / RAY_WORKERS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    _console_fd, _console_err_fd = os.dup(1), os.dup(2)
    _point_std_at(path)
    warnings.simplefilter("once")


@contextlib.contextmanager
def quiet_run(log_dir: Path) -> Iterator[None]:
    """The driver's side of a quiet run (pipeline, train, generate, evaluate, serve): library chatter off the
    terminal (see the module's docstring), Ray workers started meanwhile write to ``log_dir``; everything is
    restored on exit. No-op under ``--verbose``, and inside a quiet run already (a pipeline's stages keep the
    pipeline's logs/)."""
    if is_verbose() or _active_env is not None:
        yield
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        from tract_dist.runtime.ray_logging import restore_ray_data_logging

        stack.callback(restore_ray_data_logging)  # last: once RAY_DATA_LOGGING_CONFIG is unset again
        env = {k: v for k, v in _QUIET_ENV.items() if k not in os.environ}
        if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:  # vLLM's documented logging config: every process
            env["VLLM_LOGGING_CONFIG_PATH"] = str(_write_vllm_logging_config(log_dir))  # (driver, engine core,
        stack.enter_context(_env({**env, LOG_DIR_ENV: str(log_dir)}))  # Ray actors) logs to log_dir/vllm.log
        stack.enter_context(_driver_output(log_dir / DRIVER_LOG))
        stack.enter_context(_quiet_loggers(log_dir / DRIVER_LOG))
        stack.enter_context(_quiet_progress_bars())
        yield


_terminal_streams: dict[tuple[int, int, int], Any] = {}  # a text stream per terminal, kept for the process
_driver_fds: tuple[int, int] | None = None  # a quiet driver's terminal (stdout, stderr) while fds 1 and 2 are its log


def terminal_fds() -> tuple[int | None, int | None]:
    """The terminal's stdout and stderr descriptors while this process's own fds 1 and 2 go to a log (a quiet
    driver, a worker), for a subprocess whose output must reach the terminal (torchrun's ranks print their
    console lines on the stdout they inherit); (None, None) when output is not redirected."""
    return _driver_fds if _driver_fds is not None else (_console_fd, _console_err_fd)


@contextlib.contextmanager
def _driver_output(path: Path) -> Iterator[None]:
    """The driver of a quiet run: file descriptors 1 and 2 append to ``path`` (C++ libraries, Ray's core worker,
    processes started meanwhile such as vLLM's engine core), while Python's ``sys.stdout`` / ``sys.stderr``, when
    they are those descriptors, are rebound to the terminal: the project's lines, progress bars, Ray's forwarded
    worker lines and tracebacks still print there. Library loggers' console handlers follow them
    (:func:`_quiet_loggers`)."""
    global _driver_fds
    if _console_fd is not None or _driver_fds is not None:  # already redirected (a worker process)
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    old_streams = sys.stdout, sys.stderr
    _driver_fds = saved
    sys.stdout = _rebound(sys.stdout, 1, saved[0])
    sys.stderr = _rebound(sys.stderr, 2, saved[1])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        sys.stdout, sys.stderr = old_streams
        _driver_fds = None


def _rebound(stream: Any, fd: int, terminal: int) -> Any:
    """``stream`` if it does not write to ``fd`` (pytest's capture, a notebook's), else a line-buffered text stream
    on a duplicate of the terminal (kept open for the process: handlers may hold it after the run)."""
    try:
        if stream.fileno() != fd:
            return stream
    except (AttributeError, OSError, ValueError):
        return stream
    st = os.fstat(terminal)
    key = (st.st_dev, st.st_ino, fd)
    if key not in _terminal_streams:
        _terminal_streams[key] = os.fdopen(os.dup(terminal), "w", buffering=1,
                                           encoding=getattr(stream, "encoding", None) or "utf-8",
                                           errors=getattr(stream, "errors", None) or "replace")
    return _terminal_streams[key]


def _write_vllm_logging_config(log_dir: Path) -> Path:
    """vLLM's logging as a ``logging.config.dictConfig`` file (``VLLM_LOGGING_CONFIG_PATH``): everything of the
    ``vllm`` logger into ``log_dir/vllm.log``, errors also on stderr. Read by vLLM when it is imported, so every
    process started during the run (the engine core, Ray actors) applies it too."""
    import json

    config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_dir / VLLM_LOG),
                              "formatter": "plain", "level": "DEBUG", "encoding": "utf-8"},
                     "errors": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "plain", "level": "ERROR"}},
        "loggers": {"vllm": {"handlers": ["file", "errors"], "level": "INFO", "propagate": False}},
    }
    path = log_dir / "vllm-logging.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


_active_env: dict[str, str | None] | None = None  # a quiet run's previous values of the variables it set


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    global _active_env
    with temporary_env(values) as saved:
        outer, _active_env = _active_env, saved
        try:
            yield
        finally:
            _active_env = outer


def in_quiet_run() -> bool:
    """Inside :func:`quiet_run` (in this process)."""
    return _active_env is not None


def set_for_run(name: str, value: str) -> bool:
    """Set an environment variable for the rest of the quiet run (unset or restored when it ends); False, and
    nothing set, outside a quiet run."""
    if _active_env is None:
        return False
    _active_env.setdefault(name, os.environ.get(name))
    os.environ[name] = value
    return True


_requiet: Any = None  # the quiet run's logger quieting, for handlers libraries add later (quiet_new_loggers)


def quiet_new_loggers() -> None:
    """Within a quiet run, treat the console handlers libraries added since it began as the run treated the others
    (Ray Serve sets up its logger when it starts). No-op outside a quiet run."""
    if _requiet is not None:
        _requiet()


@contextlib.contextmanager
def _quiet_loggers(path: Path) -> Iterator[None]:
    """Library loggers: console handlers at WARNING, INFO to ``path``; library warnings logged there, once each."""
    import importlib.util

    if "mlflow" not in sys.modules and importlib.util.find_spec("mlflow") is not None:
        import mlflow  # noqa: F401 - it sets its loggers' handlers when imported: do that before changing them

    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    raised: list[tuple[logging.Handler, int]] = []
    touched: list[logging.Logger] = []
    moved: list[tuple[logging.StreamHandler, Any]] = []

    def quiet_handlers() -> None:
        for name in _LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and \
                        all(h is not r for r, _ in raised):
                    raised.append((h, h.level))
                    h.setLevel(max(h.level, _CONSOLE_LEVELS.get(name, logging.WARNING)))
                    target = {id(sys.__stdout__): sys.stdout, id(sys.__stderr__): sys.stderr}.get(id(h.stream))
                    if target is not None and target is not h.stream:  # made before the run: the terminal still
                        moved.append((h, h.setStream(target)))
            if (logger.handlers or not logger.propagate) and logger not in touched:
                logger.addHandler(file_handler)
                touched.append(logger)

    global _requiet
    quiet_handlers()
    _requiet = quiet_handlers
    notices = [(logging.getLogger(n), logging.getLogger(n).propagate) for n in _NOTICE_LOGGERS]
    for logger, _ in notices:
        logger.propagate = False  # off Ray's console handler; into the log
        logger.addHandler(file_handler)
    root = logging.getLogger()
    root.addHandler(file_handler)  # the libraries' loggers without handlers of their own propagate here
    py_warnings = logging.getLogger("py.warnings")
    old_propagate = py_warnings.propagate
    py_warnings.addHandler(file_handler)
    py_warnings.propagate = False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            yield
    finally:
        _requiet = None
        for logger, propagate in notices:
            logger.removeHandler(file_handler)
            logger.propagate = propagate
        logging.captureWarnings(False)
        py_warnings.removeHandler(file_handler)
        py_warnings.propagate = old_propagate
        root.removeHandler(file_handler)
        for logger in touched:
            logger.removeHandler(file_handler)
        for h, level in raised:
            h.setLevel(level)
        for h, stream in moved:
            h.setStream(stream)
        file_handler.close()


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """The progress bars of libraries already imported in this process (the environment covers later ones)."""
    undo: list[Any] = []
    if "datasets" in sys.modules:
        from datasets.utils import logging as ds_logging

        if ds_logging.is_progress_bar_enabled():
            ds_logging.disable_progress_bar()
            undo.append(ds_logging.enable_progress_bar)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        level = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()
        undo.append(lambda: tf_logging.set_verbosity(level))
        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            undo.append(tf_logging.enable_progress_bar)
    try:
        yield
    finally:
        for f in reversed(undo):
            f()
