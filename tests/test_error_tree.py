"""One error tree (#30): every user-facing error class of the library derives from ``TractError`` (exit 2) or
``RunFailure`` (exit 1), the CLI maps those two bases, and no module the CLI loads imports the CLI back. One
terminal: only the entry points print; the library logs."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from tract_dist.errors import RunFailure, TractError

PKG = Path(__file__).resolve().parents[1] / "tract_dist"

# Raised and handled inside the library, never reaching a command's caller (each with where it is handled).
INTERNAL = {
    "DroppedExample": "data.encode: a record too long for max_length, counted and reported by the readers",
    "_RecordError": "data.formats: one bad record, turned into a DataError naming file, record and field",
    "JSONNestingError": "jsontext: a JSONDecodeError subclass, reported by the readers as a DataError",
    "ApiError": "serve.ingress: an HTTP error response (4xx/5xx), never raised past the server",
    "RequestError": "serve.templates: a request field the server answers with 422",
}


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every exception class defined at the top level of tract_dist's modules."""
    out = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception", "Failure")) or b.id in (
                        "TractError", "RunFailure")) or isinstance(b, ast.Attribute) and b.attr.endswith("Error")
                    for b in node.bases):
                out.append((module, node.name))
    return out


def test_every_library_error_derives_from_one_of_the_two_bases():
    classes = _error_classes()
    assert len(classes) >= 20  # the scan finds them (so the check below can fail)
    stray = []
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        if name in INTERNAL or module == "tract_dist.errors":
            continue
        if issubclass(cls, TractError) == issubclass(cls, RunFailure):  # neither, or both
            stray.append(f"{module}.{name}")
    assert not stray, f"derive these from tract_dist.errors.TractError or RunFailure: {stray}"


def test_no_module_but_the_cli_imports_the_cli():
    users = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "cli.py" and path.parent == PKG:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "tract_dist.cli" or isinstance(
                    node, ast.Import) and any(a.name == "tract_dist.cli" for a in node.names):
                users.append(str(path.relative_to(PKG)))
    assert not users, users


# The modules that own the terminal: the command line, each stage's commands, and console.py (how a line reaches it).
ENTRY_POINTS = ("cli.py", "commands.py", "console.py")
_TERMINAL_WRITES = ("print", "sys.stdout.write", "sys.stderr.write", "sys.__stdout__.write", "sys.__stderr__.write")


def _terminal_writes(tree: ast.AST) -> list[tuple[int, str]]:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return [(n.lineno, ast.unparse(n.func)) for n in calls if ast.unparse(n.func) in _TERMINAL_WRITES]


def test_only_entry_points_print_the_library_logs():
    """A print (or a write to sys.stdout / sys.stderr) in a library module fails here: log through
    ``logging.getLogger(__name__)``, with ``extra=console.CONSOLE`` for a line meant for the terminal."""
    assert _terminal_writes(ast.parse("import sys\nprint(1)\nsys.stderr.write('x')\n")) == [
        (2, "print"), (3, "sys.stderr.write")]  # the scan finds them (so the check below can fail)
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name in ENTRY_POINTS:
            continue
        found += [f"{path.relative_to(PKG)}:{line}: {call}" for line, call in _terminal_writes(ast.parse(
            path.read_text()))]
    assert not found, found


@pytest.mark.parametrize("raised,code", [("config", 2), ("asset", 2), ("stale", 2), ("checkpoint", 1),
                                         ("worker", 1)])
def test_the_cli_maps_the_two_bases_to_exit_2_and_1(monkeypatch, capsys, raised, code):
    """A command raising any subclass of a base gets that base's exit status and a one-line message."""
    import tract_dist.cli as cli
    from tract_dist.config import ConfigError
    from tract_dist.data.assets import AssetError
    from tract_dist.generate.shards import StaleGenerationError
    from tract_dist.train.session import CheckpointError
    from tract_dist.train.trainer import WorkerFailedError

    error = {"config": ConfigError, "asset": AssetError, "stale": StaleGenerationError,
             "checkpoint": CheckpointError, "worker": WorkerFailedError}[raised]

    def fail(args: argparse.Namespace) -> int:
        raise error(f"the {raised} message")

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_subparsers().add_parser("boom").set_defaults(func=fail)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["boom"]) == code
    err = capsys.readouterr().err
    assert err == f"tract-dist: error: the {raised} message\n"
