"""A package's public names, imported from their submodules on first use (PEP 562), so that importing the
package (``tract-dist`` imports each stage's ``commands``) does not import torch, Ray or MLflow."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``exports`` maps each public name to the submodule (relative to
    the package) that defines it, looked up there on every access (a patched submodule is seen)."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    return __getattr__
