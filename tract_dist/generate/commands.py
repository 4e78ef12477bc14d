"""``tract-dist generate``: the stage-1 model writes CoTs for the training set; ``stage2`` builds the dataset."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from tract_dist.cli_args import add_fresh_arg


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("generate", help="generate CoTs for the training prompts (Ray Data actor pool; resumable)")
    p.add_argument("--model", help="the stage-1 export (HF folder); overrides model.name_or_path")
    p.add_argument("--output-dir", help="default generation.output_dir, else {training.output_dir}/generate")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stage2-out", help="also build the stage-2 training JSONL here from the generations, selected "
                                        "by generation.select")
    add_fresh_arg(p, "if the output folder holds CoTs made with other settings, move it aside and start afresh")
    add_config_args(p, required=True)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.generate.pipeline import GenerateSpec, generate_cots, load_training_examples
    from tract_dist.generate.stage2 import build_stage2_dataset

    cfg = load_config(args.config, args.overrides)
    examples = load_training_examples(cfg.data)
    from tract_dist.aliases import check_model_source

    if args.model:
        check_model_source(args.model, "--model")
    summary = generate_cots(GenerateSpec.of(cfg), args.model, args.output_dir, examples=examples,
                            show_progress=not args.no_progress, fresh=args.fresh)
    out = {"generate": summary}
    if args.stage2_out:
        from tract_dist.data.score_tokens import parse_scale
        from tract_dist.generate.pipeline import judge_rail_normalize
        from tract_dist.generate.select import SelectionSpec, summary_line

        lo, hi = parse_scale(cfg.data.scale)
        model = args.model or cfg.model.name_or_path
        out["stage2"] = build_stage2_dataset(summary["output_dir"], examples, args.stage2_out,
                                             SelectionSpec.from_config(cfg.generation),
                                             score_values=list(range(lo, hi + 1)),
                                             rail_normalize=judge_rail_normalize(cfg.evaluation, model))
        print(f"stage2: {summary_line(out['stage2']['selection'])}")
    print(json.dumps(out, indent=2))
    return 0
