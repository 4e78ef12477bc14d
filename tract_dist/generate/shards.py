"""The generation output folder: committed JSONL shards, the settings they were made with, failures, summary.

Why shards committed by rename: a job killed at any moment leaves only whole shards (a shard is written to a
temporary name and renamed, which is atomic on one filesystem), so a rerun reads the ids already present and
generates exactly the rest, no example lost or duplicated. Failed generations are records too (status
``failed`` with a reason), so they are counted and listed, never silently missing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tract_dist.data.schema import DataError

SHARD_GLOB = "part-*.jsonl"
SETTINGS = "settings.json"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"


def cot_uid(example_id: str, cot_index: int) -> str:
    """The stable id of one CoT: the example id and the CoT index."""
    return f"{example_id}#cot{cot_index}"


class ShardStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def remove_stale(self) -> int:
        """Delete temp files of writes interrupted before their rename (never committed); return how many."""
        stale = list(self.dir.glob(".*.tmp"))
        for p in stale:
            p.unlink()
        return len(stale)

    def shard_paths(self) -> list[Path]:
        return sorted(self.dir.glob(SHARD_GLOB))

    def records(self) -> Iterator[dict[str, Any]]:
        """Every committed record; a corrupt line is an error naming its shard and line (shards are atomic)."""
        for path in self.shard_paths():
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(str(path), f"not valid JSON: {e}", index=i) from None

    def done_uids(self) -> set[str]:
        return {r["uid"] for r in self.records()}

    def write_shard(self, records: list[dict[str, Any]]) -> Path:
        """Commit ``records`` as the next shard: write a hidden temp file, fsync, rename."""
        existing = [int(p.stem.split("-")[1]) for p in self.shard_paths()]
        final = self.dir / f"part-{(max(existing) + 1 if existing else 0):05d}.jsonl"
        tmp = self.dir / f".{final.name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record the settings on first use; refuse to mix outputs made with different ones into one folder."""
        path = self.dir / SETTINGS
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            if diff and self.shard_paths():
                from tract_dist.cli import UsageError

                raise UsageError(f"{self.dir} holds generations made with other settings "
                                 f"({'; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                                 "use another output folder or remove it")
        _write_json(path, settings)

    def finalize(self, expected_uids: set[str], extra: dict[str, Any]) -> dict[str, Any]:
        """Rewrite failures.jsonl and summary.json from the committed shards; return the summary."""
        counts: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        failures = []
        new_tokens = 0
        for r in self.records():
            counts[r["uid"]] += 1
            new_tokens += int(r.get("new_tokens") or 0)
            if r["status"] != "ok":
                reasons[r["reason"] or "unknown"] += 1
                failures.append(r)
        tmp = self.dir / f".{FAILURES}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in failures:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, self.dir / FAILURES)
        summary = {
            "expected": len(expected_uids),
            "committed": sum(counts.values()),
            "ok": sum(counts.values()) - len(failures),
            "failed": len(failures),
            "failure_reasons": dict(reasons),
            "duplicates": sum(c - 1 for c in counts.values() if c > 1),
            "missing": len(expected_uids - set(counts)),
            "unexpected": len(set(counts) - expected_uids),
            "shards": len(self.shard_paths()),
            "generated_tokens_total": new_tokens,
            **extra,
        }
        _write_json(self.dir / SUMMARY, summary)
        return summary


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_generated(out_dir: str | Path) -> list[dict[str, Any]]:
    """All committed records of a generation folder (ok and failed)."""
    d = Path(out_dir)
    if not d.is_dir():
        raise DataError(str(d), "generation folder not found")
    return list(ShardStore(d).records())
