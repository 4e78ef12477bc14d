"""``tract-dist evaluate``: judge the configured benchmarks and report Pearson/Spearman/Kendall/RMSE."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("evaluate", help="evaluate a judge on evaluation.benchmarks (files or hf:NAME)")
    p.add_argument("--model", help="model folder (e.g. the stage-2 export); default model.name_or_path")
    p.add_argument("--output-dir", help="default evaluation.output_dir, else {training.output_dir}/evaluate")
    p.add_argument("--no-progress", action="store_true")
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.evaluate.runner import EvaluateSpec, evaluate_model

    from tract_dist.aliases import check_model_source

    cfg = load_config(args.config, args.overrides)
    check_model_source(args.model or cfg.model.name_or_path, "--model" if args.model else "model.name_or_path")
    results = evaluate_model(EvaluateSpec.of(cfg), args.model, args.output_dir, show_progress=not args.no_progress)
    print(json.dumps({name: r["overall"] for name, r in results.items()}, indent=2))
    return 0
