"""The Python that the shell scripts run inline (heredocs in scripts/*.sh, e.g. setup-env.sh's cache warm-up)
imports names that exist: a module moved or renamed in the package breaks them only at set-up time, on a
fresh machine, where no other test looks (a moved alias list once failed every fresh set-up)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEREDOC = re.compile(r"python3? - [^\n]*<<'?(\w+)'?[^\n]*\n(.*?)\n\1\n", re.S)


def _snippets() -> list[tuple[str, str]]:
    out = []
    for script in sorted((REPO / "scripts").glob("*.sh")):
        for m in HEREDOC.finditer(script.read_text()):
            out.append((script.name, m.group(2)))
    return out


def test_the_scripts_have_inline_python():
    assert any(name == "setup-env.sh" for name, _ in _snippets())  # the pattern still finds them


@pytest.mark.parametrize("name,code", _snippets(), ids=lambda v: v if v.endswith(".sh") else "")
def test_inline_python_imports_resolve(name, code):
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tract_dist"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{name}: from {node.module} import {', '.join(missing)}: no such name"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tract_dist"):
                    importlib.import_module(a.name)
