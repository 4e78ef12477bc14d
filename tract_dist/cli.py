"""``tract-dist``: one subcommand per stage. Thin: it parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable

from tract_dist.config import ConfigError, dump_config, load_config
from tract_dist.cli_args import (int_arg, max_length_arg, non_negative_arg, positive_arg,  # noqa: F401
                                 safe_name_arg, scale_arg)
from tract_dist.errors import RunFailure, TractError, UsageError  # noqa: F401 - UsageError stays importable here


def _add_config_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    if required:
        p.add_argument("config", help="YAML config file")
    else:
        p.add_argument("--config", default=None, help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _cmd_score_tokens(args: argparse.Namespace) -> int:
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.data.score_scale import derive_score_scale

    cfg = _optional_config(args)
    tokenizer = args.tokenizer or (cfg and (cfg.model.tokenizer or cfg.model.name_or_path))
    if not tokenizer:
        raise ConfigError("--tokenizer is required (or a config with model.name_or_path)")
    scale = args.scale or (cfg.data.scale if cfg else "1-5")
    full = derive_score_scale(load_tokenizer(tokenizer), scale)
    # one token per value: {"scores", "token_ids"} as before; else each value's tokens and the trie's nodes
    print(json.dumps(full.score_tokens().as_dict() if full.single_token else full.as_dict()))
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from tract_dist.data.inspect import inspect_data

    cfg = _optional_config(args)
    data = cfg.data if cfg else None
    tokenizer = args.tokenizer or (cfg and (cfg.model.tokenizer or cfg.model.name_or_path))
    if not tokenizer:
        raise ConfigError("--tokenizer is required (or a config with model.name_or_path)")
    summary = inspect_data(
        args.path,
        args.format or (data.train_format if data else "jsonl"),
        tokenizer,
        max_length=args.max_length or (data.max_length if data else 3000),
        scale=args.scale or (data.scale if data else "1-5"),
        skip_invalid=args.skip_invalid or bool(data and data.skip_invalid),
        truncation=args.truncation or (data.truncation if data else "truncate"),
        enable_thinking=bool(data and data.enable_thinking),
    )
    print(json.dumps(summary, indent=None if args.compact else 2))
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from tract_dist.data.convert import convert_to_jsonl
    from tract_dist.data.score_tokens import parse_scale

    summary = convert_to_jsonl(args.path, args.format, args.output, scale=parse_scale(args.scale),
                               offset=args.offset, limit=args.max_examples, skip_invalid=args.skip_invalid)
    print(json.dumps(summary, indent=None if args.compact else 2))
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    return 0


def _cmd_config_keys(args: argparse.Namespace) -> int:
    from tract_dist.config_keys import config_keys, format_keys

    print(format_keys(config_keys(), args.format), end="")
    return 0


def _optional_config(args: argparse.Namespace) -> Any:
    if getattr(args, "config", None) is None and not getattr(args, "overrides", None):
        return None
    base = None if args.config else {"model": {"name_or_path": "unset"}}
    return load_config(args.config, args.overrides, base=base)


# Each stage contributes its subcommands through ``register(subparsers, add_config_args)`` in these modules;
# they import their heavy dependencies (torch, Ray, DeepSpeed) inside the command functions only.
_STAGE_COMMANDS = (
    "tract_dist.train.commands",
    "tract_dist.generate.commands",
    "tract_dist.judge.commands",
    "tract_dist.evaluate.commands",
    "tract_dist.pipeline.commands",
    "tract_dist.serve.commands",
    "tract_dist.plan.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tract-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score-tokens", help="print the score token ids a tokenizer gives a scale")
    p.add_argument("--tokenizer", help="HF name/path or alias: mistral, llama3, smollm2")
    p.add_argument("--scale", type=scale_arg, help="MIN-MAX, default 1-5")
    _add_config_args(p, required=False)
    p.set_defaults(func=_cmd_score_tokens)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="validate, render and tokenise a data file; print a JSON summary")
    p.add_argument("path")
    p.add_argument("--format", choices=["feedback-collection", "prometheus-eval", "jsonl"])
    p.add_argument("--tokenizer")
    p.add_argument("--max-length", type=max_length_arg)
    p.add_argument("--scale", type=scale_arg)
    p.add_argument("--truncation", choices=["truncate", "drop"])
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    _add_config_args(p, required=False)
    p.set_defaults(func=_cmd_data_inspect)

    p = data.add_parser("convert", help="read a data file through the project's reader for its format and write "
                                        "the project's JSONL (a record range with --offset/--max-examples)")
    p.add_argument("path")
    p.add_argument("--format", required=True, choices=["feedback-collection", "prometheus-eval", "jsonl"])
    p.add_argument("--output", "-o", required=True, help="the JSONL file to write (replaced atomically)")
    p.add_argument("--offset", type=non_negative_arg, default=0, help="first record to convert (0-based)")
    p.add_argument("--max-examples", type=positive_arg, help="records to convert from --offset (default: all)")
    p.add_argument("--scale", type=scale_arg, default="1-5")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and report) malformed records")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=_cmd_data_convert)

    cfg = sub.add_parser("config", help="configuration utilities").add_subparsers(dest="config_command",
                                                                                   required=True)
    p = cfg.add_parser("show", help="validate a config (with overrides) and print it in full")
    _add_config_args(p, required=True)
    p.set_defaults(func=_cmd_config_show)
    p = cfg.add_parser("keys", help="list every config key with its type, default and description")
    p.add_argument("--format", choices=["text", "markdown"], default="text",
                   help="text: one aligned line per key (long defaults shortened); markdown: a table")
    p.set_defaults(func=_cmd_config_keys)

    for module in _STAGE_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a stage not built yet; anything else is a real error
            if e.name != module:
                raise
            continue
        mod.register(sub, _add_config_args)
    for name in _VERBOSE_COMMANDS:
        if name in sub.choices:
            sub.choices[name].add_argument(
                "-v", "--verbose", action="store_true",
                help="show every library's output (Ray, Ray Data, Ray Serve, DeepSpeed, transformers, vLLM, MLflow) "
                     "on the console; default: only the run's own lines, the rest in the run folder's logs/")
    return parser


# The commands that run workers and libraries whose chatter console.py keeps off the terminal.
_VERBOSE_COMMANDS = ("pipeline", "train", "train-real", "generate", "evaluate", "serve", "judge")


class Terminated(SystemExit):
    """SIGTERM (e.g. ``ray job stop``, a scheduler's kill): unwinds like Ctrl-C so runs end KILLED."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


# Errors about a path the user named (a config, --output, a data file): a message and exit 2, not a traceback.
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    # Overrides may follow options too (``train CONFIG --launcher inline a.b=1``): argparse's positional
    # list stops at the first option, so the rest arrive as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    from tract_dist.tracking.mlflow_run import set_source

    # The runs' Source column: the command and its config, e.g. "tract-dist pipeline configs/quickstart.yaml".
    set_source(" ".join(["tract-dist", *(a for a in (argv if argv is not None else sys.argv[1:])[:2])]))
    from tract_dist import console

    console.attach()  # the entry point owns the terminal: the library's console lines (logged) show here
    if getattr(args, "verbose", False):
        console.set_verbose(True)  # through the environment: Ray workers and subprocesses inherit it
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TractError as e:  # bad input or usage: the message says what to change
        print(f"tract-dist: error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:  # the run failed (not its input), with its own explanation
        print(f"tract-dist: error: {e}", file=sys.stderr)
        return 1
    except _PATH_ERRORS as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"tract-dist: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # ``python -m tract_dist.cli`` (the quickstart) runs this file as ``__main__``, a second copy of the module:
    # an error class defined here would be two classes, and ``__main__``'s handlers would miss the library's (a
    # traceback instead of exit 2), so run the imported module's ``main``.
    from tract_dist.cli import main as _imported_main

    sys.exit(_imported_main())
