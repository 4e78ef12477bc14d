"""``tract-dist serve``: the judge as an HTTP server on Ray Serve (see tract_dist/serve/README.md)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from tract_dist import jsontext


def _port(text: str) -> int:
    from tract_dist.cli_args import int_arg

    v = int_arg(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= v <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 s, got {v}")
    return v


def _count(text: str) -> int:
    from tract_dist.cli_args import int_arg

    v = int_arg(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _replicas(args: argparse.Namespace) -> tuple[int, tuple[int, int] | None]:
    """``--replicas N`` (fixed) or ``--min-replicas A --max-replicas B`` (autoscaled), never both."""
    from tract_dist.errors import UsageError

    lo, hi = args.min_replicas, args.max_replicas
    if lo is None and hi is None:
        return args.replicas or 1, None
    if args.replicas is not None:
        raise UsageError("--replicas is a fixed count; with --min-replicas/--max-replicas the autoscaler decides: "
                         "give one or the other")
    if lo is None or hi is None:
        raise UsageError("autoscaling needs both --min-replicas and --max-replicas")
    if lo > hi:
        raise UsageError(f"--min-replicas {lo} is more than --max-replicas {hi}")
    return max(lo, 1), (lo, hi)


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    from tract_dist.cli_args import positive_arg, safe_name_arg

    p = sub.add_parser("serve", help="serve a judge over HTTP (Ray Serve): /v1/judge, OpenAI /v1/chat/completions, "
                                     "OpenRLHF /get_reward")
    p.add_argument("model", help="HF folder (e.g. a TRACT export), hub name or alias (smollm2)")
    p.add_argument("--replicas", type=positive_arg, default=None,
                   help="judge replicas, fixed (one per GPU on a GPU cluster; default 1)")
    p.add_argument("--min-replicas", type=_count, help="autoscaling: at least this many replicas (0: scale to zero; "
                                                       "the first request then waits for a model to load)")
    p.add_argument("--max-replicas", type=positive_arg, help="autoscaling: at most this many replicas (Serve adds one "
                                                          "when each holds more than a batch of requests)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--address", help="Ray cluster to deploy on (ray://HOST:PORT or auto); default: a local Ray")
    p.add_argument("--api-key-env", metavar="VAR", help="require the API key held by this environment variable")
    p.add_argument("--backend", choices=["hf", "vllm", "auto"], help="inference engine; default evaluation.backend")
    p.add_argument("--model-id", help="the name clients send as 'model'; default: the folder's name")
    p.add_argument("--max-batch-size", type=positive_arg, default=16, help="inputs per batched judge call (1: off)")
    p.add_argument("--batch-wait-timeout-s", type=_seconds, default=0.01,
                   help="how long a call waits for others to batch with")
    p.add_argument("--request-timeout-s", type=_seconds, default=120.0, help="per-request deadline (then 504)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-body-bytes", type=positive_arg, default=None, help="largest request body (default 4 MiB)")
    p.add_argument("--rubric", help="JSON file {criteria, score_descriptions}: /get_reward's rubric when a label "
                                    "gives none")
    from tract_dist.serve.templates import ALIASES, CHOICES

    p.add_argument("--policy-template", default="auto", choices=[*CHOICES, *ALIASES],
                   help="/get_reward: the chat template of the policy's queries (auto: detected per query among "
                        "llama3, chatml, mistral, gemma, phi3, then the judge's own; none: plain text)")
    p.add_argument("--register-name", type=safe_name_arg,
                   help="register the served model under this name in the MLflow model registry")
    add_config_args(p, required=False)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tract_dist.errors import UsageError
    from tract_dist.config import load_config
    from tract_dist.aliases import check_model_source
    from tract_dist.serve.app import ServeOptions, default_model_id, run_server

    replicas, autoscale = _replicas(args)
    overrides = list(args.overrides or [])
    if args.backend:
        overrides.append(f"evaluation.backend={args.backend}")
    cfg = load_config(args.config, overrides, base=None if args.config else {"model": {"name_or_path": args.model}})
    check_model_source(args.model, "model")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env: the environment variable {args.api_key_env} is unset or empty")
    rubric = _read_rubric(args.rubric) if args.rubric else None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        import sys

        print(f"[serve] warning: --host {args.host} without --api-key-env: anyone who can reach this port can use "
              "the judge", file=sys.stderr)
    from tract_dist.models.loading import materialize_alias

    model_path = materialize_alias(args.model)
    opts = ServeOptions(model_id=args.model_id or default_model_id(args.model), replicas=replicas,
                        autoscale=autoscale,
                        cpus_per_replica=args.cpus_per_replica,
                        gpus_per_replica=float(cfg.evaluation.tensor_parallel_size) if cfg.cluster.use_gpu else 0.0,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                        request_timeout_s=args.request_timeout_s, api_key=api_key, default_rubric=rubric,
                        policy_template=args.policy_template,
                        **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    tracking = cfg.tracking.enabled and bool(args.config or os.environ.get("MLFLOW_TRACKING_URI") or
                                             args.register_name)
    return run_server(cfg, model_path, opts, host=args.host, port=args.port, address=args.address,
                      tracking=tracking, registered_name=args.register_name)


def _read_rubric(path: str) -> dict[str, Any]:
    from tract_dist.errors import UsageError

    try:
        obj = jsontext.loads(Path(path).read_text(encoding="utf-8"))  # deep nesting: a JSONDecodeError too
    except json.JSONDecodeError as e:
        raise UsageError(f"--rubric {path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("criteria"), str) or not isinstance(
            obj.get("score_descriptions"), list):
        raise UsageError(f"--rubric {path}: expected an object with criteria (a string) and score_descriptions "
                         "(a list of strings, lowest score first)")
    unknown = set(obj) - {"criteria", "score_descriptions", "reference_answer"}
    if unknown:
        raise UsageError(f"--rubric {path}: unknown key(s) {sorted(unknown)}")
    return obj
