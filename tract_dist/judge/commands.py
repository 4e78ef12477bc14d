"""``tract-dist judge``: score one input (flags or JSON) or a whole file with a judge model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tract_dist import jsontext
from tract_dist.errors import UsageError

if TYPE_CHECKING:
    from tract_dist.config import Config


def register(sub: Any, add_config_args: Callable[..., None]) -> None:
    p = sub.add_parser("judge", help="judge inputs with CoT-RAIL (or the decode / score-only baselines)")
    p.add_argument("--model", help="HF folder (e.g. a TRACT export), hub name or alias; default model.name_or_path")
    p.add_argument("--mode", choices=["cot_rail", "decode", "rail"], help="default evaluation.mode")
    from tract_dist.cli_args import positive_arg

    p.add_argument("--n-cots", type=positive_arg, help="CoTs per input (greedy for 1); default evaluation.num_cots")
    p.add_argument("--instruction")
    p.add_argument("--response")
    p.add_argument("--criteria")
    p.add_argument("--score-description", action="append", dest="score_descriptions", metavar="TEXT",
                   help="one per score value, lowest first (repeat the flag)")
    p.add_argument("--reference-answer")
    p.add_argument("--json", dest="json_input", help="one input as a JSON object, or a .json file holding one")
    p.add_argument("--file", help="a data file to judge (see --format)")
    p.add_argument("--format", default="jsonl",
                   choices=["jsonl", "prometheus-eval", "feedback-collection", "preference-collection",
                            "prometheus-eval-pairwise", "pairs-jsonl"],
                   help="the --file's layout (relative task: jsonl means pairs-jsonl, labels optional)")
    p.add_argument("--task", choices=["absolute", "relative"],
                   help="absolute (one response, a score) or relative (two responses, p(A) and a verdict); "
                        "default data.task")
    p.add_argument("--response-a", help="relative task: the first response")
    p.add_argument("--response-b", help="relative task: the second response")
    p.add_argument("--rubric", help="relative task: the evaluation criteria")
    p.add_argument("--swap", action="store_true",
                   help="relative task: judge each pair in both orders as well (position-swap check)")
    p.add_argument("--output", help="write JSONL results here instead of stdout")
    add_config_args(p, required=False)
    p.set_defaults(func=_cmd_judge)


def _inputs(args: argparse.Namespace, scale: tuple[int, int]) -> list[Any]:
    from tract_dist.data.formats import read_examples

    given = [bool(args.file), bool(args.json_input), bool(args.instruction or args.response)]
    if sum(given) != 1:
        raise UsageError("give exactly one of --file, --json, or --instruction/--response/--criteria/"
                         "--score-description")
    if args.file and args.format == "jsonl":  # unlabeled inputs allowed: score is optional here
        return _read_jsonl_inputs(args.file)
    if args.file:
        return read_examples(args.file, args.format, scale=scale, require_feedback=False).examples
    if args.json_input:
        return [_json_object(args.json_input, "instruction, response, criteria, score_descriptions")]
    want = scale[1] - scale[0] + 1
    if not (args.instruction and args.response and args.criteria) or len(args.score_descriptions or []) != want:
        raise UsageError(f"--instruction, --response, --criteria and {want} --score-description flags are required")
    return [{"instruction": args.instruction, "response": args.response, "criteria": args.criteria,
             "score_descriptions": args.score_descriptions, "reference_answer": args.reference_answer}]


def _read_jsonl_inputs(path: str, convert: Callable[[Any, int], Any] | None = None) -> list[Any]:
    """Judge inputs from JSONL (the project's fields; id and score optional); errors name file and line.
    ``convert`` (default ``judge.as_example``) checks one object."""
    from tract_dist.data.schema import DataError
    from tract_dist.judge.judge import as_example

    as_example = convert or as_example
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "file not found")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            out.append(as_example(jsontext.loads(line), i))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise DataError(path, str(e), index=i, field_name=getattr(e, "field", None)) from None
    return out


def _pair_inputs(args: argparse.Namespace) -> list[Any]:
    """Relative-grading inputs: a pairwise file, one JSON object, or the flags; labels optional."""
    from tract_dist.data.pair_formats import read_pairs
    from tract_dist.judge.relative import as_pair

    given = [bool(args.file), bool(args.json_input), bool(args.instruction or args.response_a or args.response_b)]
    if sum(given) != 1:
        raise UsageError("give exactly one of --file, --json, or --instruction/--response-a/--response-b/--rubric")
    if args.file:
        if args.format in ("jsonl", "pairs-jsonl"):  # unlabeled pairs allowed
            return _read_jsonl_inputs(args.file, as_pair)
        if args.format not in ("preference-collection", "prometheus-eval-pairwise"):
            raise UsageError(f"--format {args.format} holds single responses; --task relative reads "
                             "preference-collection, prometheus-eval-pairwise or pairs-jsonl")
        return read_pairs(args.file, args.format, require_feedback=False)[0]
    if args.json_input:
        return [_json_object(args.json_input, "instruction, response_a, response_b, rubric")]
    if not (args.instruction and args.response_a and args.response_b and args.rubric):
        raise UsageError("--instruction, --response-a, --response-b and --rubric are required")
    return [{"instruction": args.instruction, "response_a": args.response_a, "response_b": args.response_b,
             "rubric": args.rubric, "reference_answer": args.reference_answer}]


def _json_object(text: str, fields: str) -> dict[str, Any]:
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--json: {text} is neither a JSON object nor a file")
        text = path.read_text(encoding="utf-8")
    try:
        obj = jsontext.loads(text)
    except json.JSONDecodeError as e:  # deep nesting too (jsontext)
        raise UsageError(f"--json: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--json: expected one JSON object with {fields}")
    return obj


def _cmd_judge(args: argparse.Namespace) -> int:
    from tract_dist.config import load_config
    from tract_dist.data.score_tokens import parse_scale
    from tract_dist.judge.judge import Judge, as_example

    if not args.config and not args.model:
        raise UsageError("give --model (or a config with model.name_or_path)")
    cfg = load_config(args.config, args.overrides,
                      base=None if args.config else {"model": {"name_or_path": args.model}})
    if (args.task or getattr(cfg.data, "task", "absolute")) == "relative":
        return _judge_pairs(args, cfg)
    if args.response_a or args.response_b or args.rubric or args.swap:
        raise UsageError("--response-a, --response-b, --rubric and --swap belong to --task relative")
    inputs = _inputs(args, parse_scale(cfg.data.scale))
    try:
        exs = [as_example(x, i) for i, x in enumerate(inputs)]
    except ValueError as e:
        raise UsageError(str(e)) from None
    from tract_dist.aliases import check_model_source

    check_model_source(args.model or cfg.model.name_or_path, "--model" if args.model else "model.name_or_path")
    from tract_dist import console

    # A quiet console: the judgements are the output (JSON lines, often piped); the engine's chatter (vLLM's
    # start-up, transformers) goes to training.output_dir/judge/logs (--verbose: the terminal).
    with console.quiet_run(Path(cfg.training.output_dir) / "judge" / "logs"):
        judge = Judge.from_config(cfg, args.model)
        results = judge.score_batch(exs, n_cots=args.n_cots or cfg.evaluation.num_cots,
                                    mode=args.mode or cfg.evaluation.mode)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for ex, r in zip(exs, results):
            out.write(json.dumps({"id": ex.id, **r.to_dict()}, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    failed = sum(r.score is None for r in results)
    if failed:
        print(f"judge: {failed} of {len(results)} inputs have no score (see 'failure')", file=sys.stderr)
    return 0


def _judge_pairs(args: argparse.Namespace, cfg: Config) -> int:
    """``--task relative``: p(A) and the verdict per pair (and the swapped order's with ``--swap``), JSONL."""
    from tract_dist import console
    from tract_dist.judge.relative import PairJudge, as_pair, debiased

    inputs = _pair_inputs(args)
    try:
        pairs = [as_pair(x, i) for i, x in enumerate(inputs)]
    except ValueError as e:
        raise UsageError(str(e)) from None
    from tract_dist.aliases import check_model_source

    check_model_source(args.model or cfg.model.name_or_path, "--model" if args.model else "model.name_or_path")
    mode = args.mode or cfg.evaluation.mode
    n_cots = args.n_cots or cfg.evaluation.num_cots
    if n_cots == "auto":
        n_cots = 1  # adaptive CoT counts are absolute grading's (a standard error of ŷ); one comparison here
    with console.quiet_run(Path(cfg.training.output_dir) / "judge" / "logs"):
        judge = PairJudge.from_config(cfg, args.model)
        results = judge.grade_batch(pairs, n_cots=n_cots, mode=mode, swap=args.swap)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for p, r in zip(pairs, results):
            row = {"id": p.id, **r.to_dict()}
            if args.swap:
                row["p_a_debiased"] = debiased(r)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    failed = sum(r.p_a is None for r in results)
    if failed:
        print(f"judge: {failed} of {len(results)} pairs have no verdict (see 'failure')", file=sys.stderr)
    return 0
