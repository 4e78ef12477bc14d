"""``tract-dist pipeline``, ``compare``, ``submit`` and ``job {status,logs,stop}``: the pipeline's entry points."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def _cmd_submit(args: argparse.Namespace) -> int:
    from tract_dist.plan.commands import run_plan_check
    from tract_dist.config import load_config
    from tract_dist.submit import job_logs, submit_pipeline, wait_for

    # The same check as the command it submits, here, before the upload and the cluster's start-up.
    run_plan_check(args, load_config(args.config, args.overrides), args.command_name, local=False)
    job_id = submit_pipeline(args.address, args.config, args.overrides,
                             working_dir=None if args.no_working_dir else ".", pip=args.pip or None,
                             command=args.command_name, max_upload_mb=args.max_upload_mb, force=args.force,
                             excludes=args.exclude, no_plan_check=args.no_plan_check)
    print(job_id)
    if args.wait:
        status = wait_for(args.address, job_id)
        print(job_logs(args.address, job_id), end="")
        print(f"[submit] job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    print(f"[submit] follow with: tract-dist job logs {job_id} --address {args.address}")
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    from tract_dist.submit import job_logs, job_status, stop_job

    if args.action == "status":
        print(job_status(args.address, args.job_id))
    elif args.action == "logs":
        print(job_logs(args.address, args.job_id), end="")
    else:
        print("stopped" if stop_job(args.address, args.job_id) else "not running")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.pipeline import plan_pipeline, run_pipeline

    cfg = load_config(args.config, args.overrides)
    if not args.plan:
        from tract_dist.plan.commands import run_plan_check

        run_plan_check(args, cfg, "pipeline")
    if args.plan:
        for stage, plan in plan_pipeline(cfg, name=args.name).items():
            print(f"  {stage:<40} {plan.status:<12} {plan.fingerprint or ''}")
        return 0
    summary = run_pipeline(cfg, config_path=args.config, address=args.address, name=args.name, fresh=args.fresh)
    print(summary.render())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tract_dist.tracking.compare import compare_runs

    print(compare_runs(args.tracking_uri, args.experiment, fmt=args.format))
    return 0


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("pipeline", help="stage 1 -> CoT generation -> stage 2 -> evaluation, resumable")
    from tract_dist.cli_args import add_fresh_arg, add_ray_address_arg, safe_name_arg

    add_ray_address_arg(p)
    p.add_argument("--name", type=safe_name_arg,
                   help="pipeline name (default: pipeline-<config fingerprint>; same name resumes)")
    add_fresh_arg(p, "a stage whose outputs were made with other settings is moved aside and redone")
    p.add_argument("--plan", action="store_true",
                   help="print each stage's status (up to date, to run, not selected, waiting) and fingerprint; "
                        "run nothing")
    from tract_dist.plan.commands import add_plan_check_arg

    add_plan_check_arg(p)
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("compare", help="table of runs (method, model, per-benchmark metrics) from MLflow")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="tract-dist")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("submit", help="submit the pipeline to a Ray cluster via the Ray Jobs API")
    p.add_argument("--address", required=True, help="the head's dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--pip", action="append", help="extra pip requirement for the job's runtime env (repeatable)")
    p.add_argument("--no-working-dir", action="store_true", help="do not upload the current directory")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="also leave out files matching this gitignore pattern (repeatable); secrets and bulk "
                        "(.env*, keys, tokens, mlflow.db, runs/, checkpoints, .git, wheels) are always left out")
    p.add_argument("--max-upload-mb", type=float, default=50.0,
                   help="refuse a working_dir upload larger than this (default 50 MiB) unless --force")
    p.add_argument("--force", action="store_true", help="upload even above --max-upload-mb")
    p.add_argument("--command", dest="command_name", default="pipeline", choices=["pipeline", "train",
                                                                                   "generate", "evaluate"])
    p.add_argument("--wait", action="store_true", help="wait for the job, print its logs, exit with its status")
    add_plan_check_arg(p)
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("job", help="status, logs or stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", required=True)
    p.set_defaults(func=_cmd_job)
