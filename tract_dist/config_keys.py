"""The reference of every config key, read from the models themselves: ``tract-dist config keys``.

Each key is documented where it is declared (``Field(description=...)`` in :mod:`tract_dist.config`, as TRL
documents its configs), so this listing cannot drift from the code: it walks the models in declaration order,
into nested sections and into the items of list-of-section keys (``evaluation.benchmarks[].name``).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

REQUIRED = "(required)"
"""The default column of a key that has no default."""

_ITEM = "[]"  # marks the items of a list-of-section key: evaluation.benchmarks[].name
_SHORT_DEFAULT = 48  # text listing: longer defaults are shortened (config show prints them whole)


@dataclass(frozen=True)
class KeyDoc:
    """One key: ``key`` dotted from the top level, ``default`` as JSON (valid YAML for an override)."""

    key: str
    type: str
    default: str
    description: str


def _section_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _list_item_section(annotation: Any) -> type[BaseModel] | None:
    return _section_of(get_args(annotation)[0]) if get_origin(annotation) is list and get_args(annotation) else None


def type_name(annotation: Any) -> str:
    """A short, YAML-minded name: ``int or null``, ``auto|hf|vllm``, ``list[str]``, ``BenchmarkSpec``."""
    if annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    if origin is typing.Annotated:  # a constrained member of a union, e.g. evaluation.num_cots: int (> 0) or auto
        base, *meta = get_args(annotation)
        bounds = ", ".join(b for m in meta if isinstance(m, FieldInfo) and (b := _bounds(m)))
        return f"{type_name(base)} ({bounds})" if bounds else type_name(base)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    """The numeric bounds pydantic enforces, e.g. ``> 0, <= 4096`` (gt/ge/lt/le metadata)."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = [f"{sign} {getattr(m, name):g}" if isinstance(getattr(m, name), float) else f"{sign} {getattr(m, name)}"
             for m in field.metadata for name, sign in signs.items() if getattr(m, name, None) is not None]
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return REQUIRED
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return json.dumps(value, ensure_ascii=False)


def walk(model: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """Every settable key under ``model`` in declaration order; a nested section contributes its keys (not a
    line of its own), a list of sections both itself and its items' keys (``KEY[].item``)."""
    out: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_of(field.annotation)
        if section is not None:
            out += walk(section, key + ".")
            continue
        bounds = _bounds(field)
        out.append(KeyDoc(key, type_name(field.annotation) + (f" ({bounds})" if bounds else ""), _default(field),
                          field.description or ""))
        item = _list_item_section(field.annotation)
        if item is not None:
            out += walk(item, f"{key}{_ITEM}.")
    return out


def config_keys() -> list[KeyDoc]:
    """Every key of :class:`tract_dist.config.Config`."""
    from tract_dist.config import Config

    return walk(Config)


def _shorten(text: str) -> str:
    return text if len(text) <= _SHORT_DEFAULT else text[:_SHORT_DEFAULT - 4] + " ..."


def format_keys(keys: list[KeyDoc], fmt: Literal["text", "markdown"] = "text") -> str:
    """``key  type  default  description`` lines (columns aligned), or a Markdown table (for the README)."""
    if fmt == "markdown":
        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        rows = ["| key | type | default | description |", "|---|---|---|---|"]
        rows += [f"| `{k.key}` | {cell(k.type)} | {k.default if k.default == REQUIRED else f'`{cell(k.default)}`'} | "
                 f"{cell(k.description)} |" for k in keys]
        return "\n".join(rows) + "\n"
    cols = [(k.key, k.type, _shorten(k.default), k.description) for k in keys]
    widths = [max(len(c[i]) for c in cols) for i in range(3)]
    return "".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}\n" for a, b, c, d in cols)
