"""What a run, a stage, a folder or a dataset *is*, as a digest: every fingerprint of the project, computed here.

A digest names what a result was computed from, so a rerun can tell "the same, skip or resume it" from
"another computation, refuse to mix it". Training runs and pipeline stages are named after them, checkpoints
and generation folders record them, MLflow datasets and logged models are found by them. Changing what any of
them covers, or how, renames existing folders (they would no longer resume): tests/test_pipeline_guards.py pins
literal values.

- :func:`fingerprint`: a config's computation (``model``, ``data``, ``loss``, ``training``), the base of run and
  pipeline names; :func:`hashed_section` and :func:`selection_key` the sections stages hash.
- :func:`json_digest`: any JSON-able value (a stage's key, generation settings, a dataset's identity).
- :func:`file_fingerprint` / :func:`content_fingerprint` / :func:`file_sha256`: the content of a data file, a
  model folder, one file; :func:`examples_digest`: the records themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tract_dist.fsutil import _cache_dir, atomic_write_json

if TYPE_CHECKING:
    from tract_dist.config import Config


# Keys added after pipelines were made, hashed only once set away from their default (which computes what the
# configs before them computed), so the folders made before them keep their fingerprints and resume.
LATER_KEYS: dict[str, dict[str, object]] = {
    "data": {"enable_thinking": False, "task": "absolute"},
    "loss": {"lam_warmup_steps": 0},
    "generation": {"max_length": None},
    "evaluation": {"cot_se_target": 0.1, "max_cots": 8, "sample_single_cot": False},
}
# What builds the stage-2 data from the CoTs, not the CoTs themselves (the generation stage does not hash them).
SELECTION_KEYS = ("select", "select_tolerance", "select_fallback")
LAYOUT_KEYS = ("packing", "max_tokens_per_micro_batch", "group_by_length")
"""training keys that change how a step is computed, not what: outside every fingerprint."""


def hashed_section(cfg: Config, section: str) -> dict[str, object]:
    """``cfg.<section>`` as fingerprints hash it: later keys at their defaults left out (``LATER_KEYS``), and
    for ``generation`` the selection keys too (the build_stage2 stage hashes them: :func:`selection_key`)."""
    d = getattr(cfg, section).model_dump()
    for key, default in LATER_KEYS.get(section, {}).items():
        if d.get(key) == default:
            d.pop(key, None)
    if section == "generation":
        for key in SELECTION_KEYS:
            d.pop(key, None)
    return d


def selection_key(cfg: Config) -> tuple[object, ...]:
    """What the stage-2 data depend on beyond the CoTs: nothing for ``select: all`` (the data every pipeline
    built before selection existed), else the rule, tolerance and fallback."""
    g = cfg.generation
    return () if g.select == "all" else ((g.select, g.select_tolerance, g.select_fallback),)


def fingerprint(cfg: Config, *extra: str) -> str:
    """Hash of everything that changes what a stage computes (not where it runs or how it is tracked).

    Pipeline names, training-run names and stage fingerprints are built on it: changing what it covers renames
    every existing run folder (they would no longer resume)."""
    d = {s: hashed_section(cfg, s) for s in ("model", "data", "loss", "training")}
    for key in ("output_dir", "num_to_keep"):  # where and how many checkpoints: the same computation
        d["training"].pop(key, None)
    # How a step's samples are laid out (padded, grouped, packed) changes only the summation order: the same
    # run may switch it when it resumes (e.g. packing on a GPU cluster with flash-attention).
    for key in LAYOUT_KEYS:
        d["training"].pop(key, None)
    if d["training"].get("global_batch_size") is None:  # unset: the rule of every earlier version, same hash
        d["training"].pop("global_batch_size", None)
    blob = json.dumps(d, sort_keys=True) + "|".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def json_digest(value: Any, length: int) -> str:
    """The first ``length`` hex digits of SHA-256 over ``value`` as canonical JSON (sorted keys, ``str`` for the
    rest): the identity of a stage's key, of generation settings, of a dataset's source (MLflow recommends
    digests of about ten digits)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


_CHUNK = 16 << 20  # hash in 16 MiB reads: a multi-GB safetensors file never sits in memory whole


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str) -> str:
    """Content hash of a local file (first 64 MiB + size), or the name itself for hub datasets."""
    p = Path(path)
    if not p.is_file():
        return path
    h = hashlib.sha256(str(p.stat().st_size).encode())
    with open(p, "rb") as f:
        h.update(f.read(64 << 20))
    return h.hexdigest()[:16]


def content_fingerprint(path: str | Path) -> str | None:
    """SHA-256 over every file of a local model folder (relative name + full content), or of one file; None
    when ``path`` is not local (a hub name or alias: the name is its identity).

    Hashing a multi-GB model takes a while, so each file's digest is cached by (path, size, mtime) under
    ``TRACT_DIST_CACHE``: a model rewritten in place (same path, new weights) gets a new hash."""
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
    cache_file = _cache_dir() / "content-hashes.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    total = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            digest = cache[key] = file_sha256(f)
            changed = True
        total.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{digest}\n".encode())
    if changed:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_file, cache, indent=None, durable=False)  # unreadable: rehashed
    return total.hexdigest()


def examples_digest(examples: Iterable[Any]) -> tuple[str, int]:
    """Ten hex digits over the records themselves (``to_dict()`` of each, in order) and their count: names exactly
    the records a benchmark scored, whatever file, split or limit they came from."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
        n += 1
    return h.hexdigest()[:10], n
