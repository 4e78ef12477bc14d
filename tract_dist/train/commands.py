"""``tract-dist train``."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def _cmd_train(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.train.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    from tract_dist.plan.commands import run_plan_check

    run_plan_check(args, cfg, "train")

    r = run_training(cfg, config_path=args.config, run_name=args.run_name,
                     launcher=args.launcher or cfg.cluster.launcher, address=args.address, fresh=args.fresh)
    return _print_outputs("train", r)


def _print_outputs(tag: str, r: Any) -> int:
    """Where a finished training run left its checkpoint, export and MLflow run."""
    from tract_dist.tracking import redact_uri

    print(f"[{tag}] checkpoint: {r.checkpoint_dir}")
    print(f"[{tag}] exported model: {r.export_dir / 'model'}")
    if r.mlflow_run_id:
        uri = redact_uri(r.tracking_uri)
        print(f"[{tag}] MLflow run: {r.mlflow_run_id} in {uri} (mlflow ui --backend-store-uri {uri})")
    return 0


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("train", help="run one CoT-RAFT training stage (Ray Train + DeepSpeed ZeRO-3)")
    from tract_dist.cli_args import add_fresh_arg, add_ray_address_arg, safe_name_arg

    add_ray_address_arg(p)
    p.add_argument("--launcher", choices=["ray", "torchrun", "inline"],
                   help="ray, torchrun (no Ray needed) or inline (one process); default: cluster.launcher (ray)")

    p.add_argument("--run-name", type=safe_name_arg,
                   help="name of the run (default: train-<config fingerprint>; same name resumes)")
    add_fresh_arg(p, "if the run folder holds a run of another configuration, move it aside and start afresh")
    from tract_dist.plan.commands import add_plan_check_arg

    add_plan_check_arg(p)
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_train)
    register_real(sub, add_config_args)


def _cmd_train_real(args: argparse.Namespace) -> int:
    from tract_dist.config import ConfigError, load_config
    from tract_dist.real.stage import run_real

    cfg = load_config(args.config, args.overrides)
    init = args.init or cfg.pipeline.real_init
    if not init:
        raise ConfigError("train-real: give --init EXPORT (or pipeline.real_init): the model REAL starts from")
    r = run_real(cfg, init, config_path=args.config, run_name=args.run_name,
                 launcher=args.launcher or cfg.cluster.launcher, address=args.address, fresh=args.fresh)
    return _print_outputs("train-real", r)


def register_real(sub: Any, add_config_args: Callable[..., None]) -> None:
    from tract_dist.cli_args import add_ray_address_arg, safe_name_arg

    p = sub.add_parser("train-real", help="REAL after TRACT: RL on the judge's own sampled CoTs, rewarded by "
                                          "-(yhat - y)^2, plus the regression term (Ray + DeepSpeed ZeRO-3, LoRA)")
    p.add_argument("--init", help="the export REAL starts from (default: pipeline.real_init)")
    add_ray_address_arg(p)
    p.add_argument("--launcher", choices=["ray", "torchrun", "inline"],
                   help="ray (rollout engines as Ray actors), torchrun or inline (engine in-process)")
    p.add_argument("--run-name", type=safe_name_arg,
                   help="name of the run (default: train_real-<fingerprint>; same name resumes)")
    p.add_argument("--fresh", action="store_true", help="move a run of another configuration aside and start afresh")
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_train_real)
