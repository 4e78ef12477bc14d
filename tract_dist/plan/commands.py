"""``tract-dist plan CONFIG [overrides]``: per-GPU memory, FLOPs and projected wall-clock of every stage."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tract_dist.config import Config


def add_plan_check_arg(p: argparse.ArgumentParser) -> None:
    """``--no-plan-check`` of the commands that plan a run before starting it (train, pipeline, submit)."""
    p.add_argument("--no-plan-check", action="store_true",
                   help="start without checking the plan (tract-dist plan): per-GPU memory against the device's")


def run_plan_check(args: argparse.Namespace, cfg: Config, command: str, *, local: bool = True) -> None:
    """The plan check before a run starts (tract_dist.plan.check), unless ``--no-plan-check``; ``local``: the
    run uses this machine (not a submitted job), so a CPU run is checked against its memory."""
    if getattr(args, "no_plan_check", False):
        return
    from tract_dist.plan.check import plan_check

    for line in plan_check(cfg, command, local=local):
        print(line, file=sys.stderr, flush=True)


def _cmd_plan(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.plan.check import COMMAND_KINDS
    from tract_dist.plan.known import KNOWN_CONFIGS
    from tract_dist.plan.report import plan_run, render

    if args.list_models:
        print("\n".join(KNOWN_CONFIGS))
        return 0
    if not args.config:
        from tract_dist.errors import UsageError

        raise UsageError("plan: a CONFIG is required (or --list-models)")
    cfg = load_config(args.config, args.overrides)
    plan = plan_run(cfg, kinds=COMMAND_KINDS[args.stages])
    print(json.dumps(plan.as_dict(), indent=2, default=str) if args.json else render(plan), end="" if not args.json
          else "\n")
    return 1 if plan.failing() else 0


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("plan", help="per-GPU memory, FLOPs and wall-clock of each stage, from the model config alone "
                                    "(no weights); exit 1 when a stage will not fit")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--stages", choices=["pipeline", "train", "generate", "evaluate"], default="pipeline",
                   help="the stages of this command (default: the whole pipeline)")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument("--list-models", action="store_true", help="the models planned without any download")
    p.set_defaults(func=_cmd_plan)
