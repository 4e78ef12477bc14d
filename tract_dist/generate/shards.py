"""The generation output folder: committed JSONL shards, the settings they were made with, failures, summary.

Why shards committed by rename: a job killed at any moment leaves only whole shards (a shard is written to a
temporary name owned by its writer, then published under a name no other writer can take: a hard link that
fails if the name exists), so a rerun reads the ids already present and generates exactly the rest, no
example lost or duplicated. Cleaning up temporary files removes only those whose writer is gone. Failed
generations are records too (status ``failed`` with a reason and an ``attempt`` number), so they are counted
and listed, never silently missing; a failure that retrying could change (an ``error: ...``) is retried by a
later pass or rerun until ``generation.max_attempts``, the others (``dropped: ...`` prompts, ``empty_cot``
with a fixed seed) are final at once. The latest record of a CoT is its state.

``settings.json`` records what the shards were made with (model content hash, sampling, prompt settings,
the stage fingerprint); a rerun with other settings is refused naming both fingerprints.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tract_dist.data.schema import DataError
from tract_dist.errors import TractError
from tract_dist.fsutil import (CorruptStateError, atomic_create_bytes, atomic_write_json, atomic_write_jsonl,
                               is_stale_temp)

SHARD_GLOB = "part-*.jsonl"
SETTINGS = "settings.json"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
# Settings keys added later: a folder written before they existed is not refused for lacking them.
_LEGACY_OPTIONAL = ("model_sha256", "fingerprint")


class StaleGenerationError(TractError, RuntimeError):
    """The folder holds CoTs made with other settings than this run's."""


def cot_uid(example_id: str, cot_index: int) -> str:
    """The stable id of one CoT: the example id and the CoT index."""
    return f"{example_id}#cot{cot_index}"


def retryable(record: dict[str, Any]) -> bool:
    """Whether another attempt could change a failed record: generation errors yes; prompts dropped as too
    long and empty CoTs (deterministic for their seed) no."""
    return record.get("status") != "ok" and str(record.get("reason") or "").startswith("error:")


class ShardStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def remove_stale(self) -> int:
        """Delete temp files of writes interrupted before their rename whose writer is gone; return how many."""
        stale = [p for p in self.dir.glob(".*.tmp") if is_stale_temp(p)]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def shard_paths(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(SHARD_GLOB) if _shard_index(p) is not None)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every committed record; a corrupt line is an error naming its shard and line (shards are atomic, so
        a broken one was damaged after it was written: restore or remove that shard, its CoTs are redone)."""
        for path in self.shard_paths():
            with open(path, encoding="utf-8", errors="strict") as f:
                try:
                    for i, line in enumerate(f):
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(str(path), f"line {i + 1} of a committed shard is not valid JSON ({e}); "
                                                       "remove the shard to regenerate its CoTs", index=i) from None
                        if not isinstance(rec, dict) or "uid" not in rec or "status" not in rec:
                            raise DataError(str(path), f"line {i + 1} is not a generation record (no uid/status); "
                                                       "remove the shard to regenerate its CoTs", index=i)
                        yield rec
                except UnicodeDecodeError as e:
                    raise DataError(str(path), f"shard is not UTF-8 ({e}); remove it to regenerate its CoTs") from None

    def latest(self) -> dict[str, dict[str, Any]]:
        """uid -> its state: an ``ok`` record if it has one, else its latest failure (with ``attempts``)."""
        state: dict[str, dict[str, Any]] = {}
        attempts: Counter[str] = Counter()
        for r in self.records():
            uid = r["uid"]
            attempts[uid] += 1
            if state.get(uid, {}).get("status") == "ok":
                continue
            state[uid] = r
        for uid, r in state.items():
            state[uid] = {**r, "attempts": attempts[uid]}
        return state

    def resolved_uids(self, max_attempts: int) -> set[str]:
        """CoTs nothing more will be done for: generated, failed for good, or out of attempts."""
        return {uid for uid, r in self.latest().items()
                if r["status"] == "ok" or not retryable(r) or r["attempts"] >= max_attempts}

    def done_uids(self) -> set[str]:
        """Every uid with a committed record (ok or failed)."""
        return {r["uid"] for r in self.records()}

    def write_shard(self, records: list[dict[str, Any]]) -> Path:
        """Commit ``records`` as the next shard, durably, under the next free name; a name another writer took
        first is never overwritten (:func:`~tract_dist.fsutil.atomic_create_bytes`): take the next one."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        while True:
            existing = [i for i in map(_shard_index, self.dir.glob(SHARD_GLOB)) if i is not None]
            final = self.dir / f"part-{(max(existing) + 1 if existing else 0):05d}.jsonl"
            try:
                atomic_create_bytes(final, data)
                return final
            except FileExistsError:
                continue  # another writer took that name first

    def check_settings(self, settings: dict[str, Any], *, fresh: bool = False) -> None:
        """Record the settings on first use; refuse to mix outputs made with different ones into one folder."""
        path = self.dir / SETTINGS
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                if self.shard_paths():
                    raise CorruptStateError(f"{path}: the generation settings are corrupt ({e}); the shards beside "
                                            "it cannot be checked against this run: restore the file, or use "
                                            "another output folder") from None
                old = {}
            diff = {k: (old.get(k), v) for k, v in settings.items()
                    if old.get(k) != v and not (k in _LEGACY_OPTIONAL and k not in old)}
            if diff and self.shard_paths():
                listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise StaleGenerationError(
                    f"{self.dir} holds generations made with other settings (fingerprint "
                    f"{old.get('fingerprint', 'unrecorded')}; this run's is {settings.get('fingerprint')}): "
                    f"{listed}. Use another output folder, or --fresh to move the old CoTs aside")
        atomic_write_json(path, settings, sort_keys=True)

    def finalize(self, expected_uids: set[str], extra: dict[str, Any], max_attempts: int = 1) -> dict[str, Any]:
        """Rewrite failures.jsonl and summary.json from the committed shards; return the summary."""
        ok_counts: Counter[str] = Counter()
        committed = 0
        new_tokens = 0
        for r in self.records():
            committed += 1
            new_tokens += int(r.get("new_tokens") or 0)
            ok_counts[r["uid"]] += r["status"] == "ok"
        state = self.latest()
        failures = [r for r in state.values() if r["status"] != "ok"]
        reasons = Counter(r.get("reason") or "unknown" for r in failures)
        atomic_write_jsonl(self.dir / FAILURES, failures)
        pending = [r for r in failures if retryable(r) and r["attempts"] < max_attempts]
        summary = {
            "expected": len(expected_uids),
            "committed": committed,
            "ok": len(state) - len(failures),
            "failed": len(failures),
            "failure_reasons": dict(reasons),
            # failed for good: the same result on every try (deterministic), or errors on max_attempts tries
            "failed_final": len(failures) - len(pending),
            "failed_retryable": len(pending),
            "retried": committed - len(state) - sum(c - 1 for c in ok_counts.values() if c > 1),
            "duplicates": sum(c - 1 for c in ok_counts.values() if c > 1),
            "missing": len(expected_uids - set(state)),
            "unexpected": len(set(state) - expected_uids),
            "shards": len(self.shard_paths()),
            "generated_tokens_total": new_tokens,
            "finished_at": time.time(),
            **extra,
        }
        atomic_write_json(self.dir / SUMMARY, summary, sort_keys=True)
        return summary


def _shard_index(p: Path) -> int | None:
    try:
        return int(p.stem.split("-")[1])
    except (IndexError, ValueError):
        return None


def read_generated(out_dir: str | Path) -> list[dict[str, Any]]:
    """All committed records of a generation folder (ok and failed; a retried CoT has one per attempt)."""
    d = Path(out_dir)
    if not d.is_dir():
        raise DataError(str(d), "generation folder not found")
    return list(ShardStore(d).records())
