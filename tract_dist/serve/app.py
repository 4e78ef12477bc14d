"""Building and running the judge application: Ray Serve with a FastAPI ingress and N judge replicas.

``build_app`` returns the Serve application (tests and the benchmark run it on the suite's Ray);
``run_server`` is ``tract-dist serve``: it starts Serve's HTTP proxy on ``host:port`` (127.0.0.1 unless told
otherwise), deploys, logs the served export to MLflow when tracking is configured, and blocks until Ctrl-C or
SIGTERM, then shuts the application and Serve down.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tract_dist.console import CONSOLE_ERR
from tract_dist.serve.schemas import MAX_BODY_BYTES

if TYPE_CHECKING:
    from tract_dist.config import Config

log = logging.getLogger(__name__)

APP_NAME = "tract-judge"
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServeOptions:
    """How the judge is served (the CLI's flags); the model, backend, prompt and sampling come from the config."""

    model_id: str
    replicas: int = 1  # fixed replica count; ignored when ``autoscale`` is set
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve adds replicas as requests queue up
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    torch_threads: int | None = None  # per CPU replica; None: the cores shared out among replicas
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    request_timeout_s: float = 120.0
    max_body_bytes: int = MAX_BODY_BYTES
    api_key: str | None = field(default=None, repr=False)  # only its SHA-256 leaves this process
    default_rubric: dict[str, Any] | None = None
    policy_template: str = "auto"  # /get_reward: the chat template of the policy's queries (serve/templates.py)

    @property
    def max_replicas(self) -> int:
        """The most replicas this deployment can run (what resources and threads are sized for)."""
        return self.autoscale[1] if self.autoscale else self.replicas

    def describe_replicas(self) -> str:
        return f"{self.autoscale[0]}-{self.autoscale[1]} replicas, autoscaled" if self.autoscale \
            else f"{self.replicas} replica(s)"


def default_model_id(model_path: str) -> str:
    """The folder's name (``runs/x/export`` -> ``x-export``): stable, readable, and no absolute path exposed."""
    p = Path(model_path)
    if p.exists():
        parts = [x for x in p.resolve().parts[-2:] if x not in ("/", "")]
        return "-".join(parts) or "tract-judge"
    return model_path.replace("/", "-")


def build_app(cfg: Config, model_path: str, opts: ServeOptions) -> Any:
    """The Serve application: the JudgeServer ingress bound to ``opts.replicas`` JudgeModel replicas (or
    between ``opts.autoscale``'s bounds)."""
    from tract_dist.serve.ingress import IngressSettings, JudgeServer
    from tract_dist.serve.replica import judge_deployment

    threads = opts.torch_threads
    if threads is None and not opts.gpus_per_replica:
        threads = max(1, (os.cpu_count() or 1) // max(1, opts.max_replicas))
    model = judge_deployment(num_replicas=opts.replicas, num_cpus=opts.cpus_per_replica,
                             num_gpus=opts.gpus_per_replica, autoscale=opts.autoscale,
                             target_ongoing_requests=opts.max_batch_size,
                             max_ongoing_requests=max(32, 2 * opts.max_batch_size)).bind(
        cfg, model_path, torch_threads=threads, max_batch_size=opts.max_batch_size,
        batch_wait_timeout_s=opts.batch_wait_timeout_s)
    key_sha = hashlib.sha256(opts.api_key.encode()).hexdigest() if opts.api_key else None
    settings = IngressSettings(model_id=opts.model_id, api_key_sha256=key_sha,
                               request_timeout_s=opts.request_timeout_s, max_body_bytes=opts.max_body_bytes,
                               default_rubric=opts.default_rubric, policy_template=opts.policy_template)
    return JudgeServer.bind(model, settings)


def start_http(host: str, port: int, request_timeout_s: float) -> None:
    """Serve's HTTP proxy on ``host:port`` (one proxy, on the head node). Serve's own request timeout is a
    backstop a little after the ingress's deadline, so the ingress answers 504 with a message first."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port, "location": "HeadOnly",
                              "request_timeout_s": request_timeout_s + 30})


def deploy(cfg: Config, model_path: str, opts: ServeOptions, *, host: str, port: int) -> Any:
    """Start the proxy and deploy; returns the ingress handle once every replica is up."""
    from ray import serve

    start_http(host, port, opts.request_timeout_s)
    return serve.run(build_app(cfg, model_path, opts), name=APP_NAME, route_prefix="/")


def run_server(cfg: Config, model_path: str, opts: ServeOptions, *, host: str, port: int, address: str | None,
               tracking: bool, registered_name: str | None = None) -> int:
    """``tract-dist serve``: connect to (or start) Ray, deploy, log the model, wait for Ctrl-C, shut down.

    A quiet console (unless --verbose): Ray's and Serve's lines, the replicas' output and the access log go to
    ``serve_log_dir(cfg, opts)`` (``runs/serve/<model id>/logs``); the terminal shows the project's lines."""
    from tract_dist import console

    log_dir = serve_log_dir(cfg, opts)
    with console.quiet_run(log_dir):
        if not console.is_verbose():
            log.info(f"[serve] Ray, Serve and replica output: {log_dir}", extra=CONSOLE_ERR)
        return _run_server(cfg, model_path, opts, host=host, port=port, address=address, tracking=tracking,
                           registered_name=registered_name)


def serve_log_dir(cfg: Config, opts: ServeOptions) -> Path:
    """Where a server's library output goes: ``training.output_dir``/serve/<model id>/logs (the id made a plain
    folder name: --model-id is the user's)."""
    from tract_dist.tracking.models import model_name

    return Path(cfg.training.output_dir).resolve() / "serve" / model_name(opts.model_id) / "logs"


def _run_server(cfg: Config, model_path: str, opts: ServeOptions, *, host: str, port: int, address: str | None,
                tracking: bool, registered_name: str | None) -> int:
    import signal
    import threading

    from ray import serve

    from tract_dist import console
    from tract_dist.runtime.ray_cluster import init_ray

    need = opts.max_replicas * opts.cpus_per_replica
    # Quiet: the replicas' and Ray's output stays in the logs (the setup hook), nothing is forwarded here.
    init_ray(address, need_cpus=need + 1, env_vars={"TOKENIZERS_PARALLELISM": "false"},
             log_to_driver=console.is_verbose())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.quiet_new_loggers()  # Serve's driver logger, made when ray.serve is imported
    try:
        deploy(cfg, model_path, opts, host=host, port=port)
        console.quiet_new_loggers()
        where = f"http://{host}:{port}"
        auth = "an API key is required" if opts.api_key else "no API key (loopback only is the safe default)"
        log.info(f"[serve] {opts.model_id} on {where} ({opts.describe_replicas()}, {auth}); POST /v1/judge, "
                 f"/v1/chat/completions, /get_reward (also under /rail, /cot_rail, /decode); GET /health, /v1/models. "
                 f"Ctrl-C stops.", extra=CONSOLE_ERR)
        info = serve.get_deployment_handle("JudgeModel", APP_NAME).describe.remote().result(timeout_s=120)
        log.info(budget_statement(info, opts.request_timeout_s), extra=CONSOLE_ERR)
        if tracking:
            _log_served_model(cfg, model_path, opts, where, registered_name)
        while not stop.wait(1.0):
            pass
        log.info("[serve] shutting down", extra=CONSOLE_ERR)
    finally:
        _mute_ray_errors_on_shutdown()
        try:
            serve.delete(APP_NAME)
        finally:
            serve.shutdown()
    return 0


def budget_statement(info: dict[str, Any], request_timeout_s: float) -> str:
    """The start-up line on the serving budget: new tokens per CoT, where that number comes from, the measured
    decode step and what a default request costs at it, with a warning when it cannot meet the deadline."""
    from tract_dist.serve.ingress import _work_bound

    mode, n_cots = info["defaults"]["mode"], info["defaults"]["n_cots"]
    bound = _work_bound(info, mode, n_cots, 1)
    line = (f"[serve] generation budget {info['max_new_tokens']} new tokens per CoT ({info['budget_source']}); one "
            f"decode step {info['decode_step_s'] * 1000:.1f} ms measured on the replica, so a default {mode} "
            f"request (n_cots {n_cots}) generates for up to ~{bound:.0f} s; deadline {request_timeout_s:g} s "
            "(--request-timeout-s)")
    if bound > request_timeout_s:
        fit = int(request_timeout_s / max(info["decode_step_s"], 1e-9) / 2)
        line += (f"\n[serve] warning: a default {mode} request cannot finish within the deadline here and will be "
                 f"refused (422); use evaluation.mode=rail (one forward pass) or serve.max_new_tokens={max(fit, 1)} "
                 "(half the deadline), or raise --request-timeout-s")
    return line


def _mute_ray_errors_on_shutdown() -> None:
    """Quiet: Serve's shutdown kills its controller while Ray retries a call to it, and Ray's driver prints that
    retry ("(raylet) Task ServeController.graceful_shutdown failed ...") from its error channel, which ignores
    log_to_driver. The flag Ray itself turns off for a breakpoint stops it (the raylet's log keeps the line)."""
    from tract_dist import console

    if console.is_verbose():
        return
    try:
        import ray._private.worker as ray_worker

        ray_worker._worker_logs_enabled = False
    except (ImportError, AttributeError):  # another Ray: the line may show, nothing else changes
        pass


def _log_served_model(cfg: Config, model_path: str, opts: ServeOptions, where: str, name: str | None) -> None:
    """The export being served, as an MLflow model in a run named after the model id (tracking observes:
    a failure is a warning)."""
    from tract_dist.tracking.mlflow_run import log_params, set_tags, start_run
    from tract_dist.tracking.models import log_model_folder

    t = cfg.tracking
    with start_run(t.tracking_uri, t.experiment, t.run_name or f"serve-{opts.model_id}",
                   tags={"tract.stage": "serve"}) as handle:
        log_params(handle, {"model_path": model_path, "model_id": opts.model_id, "replicas": opts.describe_replicas(),
                            "max_batch_size": opts.max_batch_size, "backend": cfg.evaluation.backend,
                            "mode": cfg.evaluation.mode, "num_cots": cfg.evaluation.num_cots})
        set_tags(handle, {"tract.serve.url": where})
        # The served weights: the logged model a training run made of them (linked, not copied again), else a
        # new one; the serve run's input either way.
        from tract_dist.tracking.models import model_name

        logged = log_model_folder(handle, model_path, name=model_name("served", opts.model_id),
                                  registered_model_name=name, role="input")
        if logged is not None:
            log.info(f"[serve] model logged to MLflow: {logged.model_uri}"
                     + (f" (registered {logged.registered_name} v{logged.version})" if logged.version else ""), extra=CONSOLE_ERR)
