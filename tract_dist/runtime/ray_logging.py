"""Ray's side of a quiet run (tract_dist/console.py): Ray Data's console lines, the workers' ``(pid=...)``
prefix, ``ray.init``'s logging options and where Ray keeps its own logs. Each is a no-op under ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from tract_dist import console

RAY_WORKER_SETUP_HOOK = "tract_dist.console.setup_ray_worker"
_RAY_DATA_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"


def quiet_ray_data() -> None:
    """Ray Data's console lines ("Starting execution of Dataset ...", "Progress bars disabled") at ERROR for the
    rest of a quiet run; they stay in Ray's session ``logs/ray-data/``. Through Ray Data's documented
    ``RAY_DATA_LOGGING_CONFIG`` (a file in the run's logs/), applied now and read again by Ray Data's workers;
    Ray Data's default is applied again when the run ends. Called by ``init_ray`` (Ray is imported by then); a
    no-op outside a quiet run."""
    log_dir = os.environ.get(console.LOG_DIR_ENV)
    if console.is_verbose() or not log_dir or _RAY_DATA_CONFIG_ENV in os.environ or not console.in_quiet_run():
        return
    import copy

    import yaml
    from ray.data._internal import logging as ray_data_logging

    config = copy.deepcopy(ray_data_logging.DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    path = Path(log_dir) / "ray-data-logging.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    console.set_for_run(_RAY_DATA_CONFIG_ENV, str(path))  # unset again when the quiet run ends
    ray_data_logging.configure_logging()  # the driver configures Ray Data's loggers only when importing it


def restore_ray_data_logging() -> None:
    """Ray Data's default logging again, once a quiet run has unset its config (if Ray Data was imported)."""
    if "ray.data._internal.logging" in sys.modules and _RAY_DATA_CONFIG_ENV not in os.environ:
        sys.modules["ray.data._internal.logging"].configure_logging()


@contextlib.contextmanager
def worker_lines_unprefixed() -> Iterator[None]:
    """Around ``ray.init`` in a quiet run: the workers' lines that reach the driver (only the project's console
    lines do: the rest is in the log) print as they are, without Ray's colour-coded ``(pid=...)`` prefix.
    Ray decides it once, when it connects, from ``RAY_DISABLE_WORKER_LOG_PREFIX`` (read when ray is imported,
    which may have happened before: the constant is set for the call, then restored)."""
    if console.is_verbose():
        yield
        return
    from ray._private import ray_constants

    old = ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX
    ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = True
    try:
        yield
    finally:
        ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = old


def init_options(local: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``ray.init`` options, ``runtime_env`` entries) of a quiet run: Ray's INFO lines ("Started a local Ray
    instance") off the terminal, and for a local cluster every worker process's output into the run folder's
    log through the setup hook (a remote cluster's workers cannot write the driver's folder: their output
    stays in that cluster's logs)."""
    if console.is_verbose():
        return {}, {}
    local_log = local and os.environ.get(console.LOG_DIR_ENV)
    hook = {"worker_process_setup_hook": RAY_WORKER_SETUP_HOOK} if local_log else {}
    return {"logging_level": logging.WARNING}, hook


def session_logs() -> str:
    """Where Ray keeps its own session logs (named once on the console by a quiet run)."""
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:  # noqa: BLE001 - only a hint
        return "/tmp/ray/session_latest/logs"
