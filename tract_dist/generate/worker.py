"""The generator replica: builds its engine once (HF or vLLM, from an ``EngineSpec``), turns batches of
(example, CoT index, seed) rows into CoT records, each with its own RAIL read-out.

The read-out is the model's ŷ for the CoT it just wrote: ``<prompt><CoT> So the overall score is`` (the tokens
training and the judge use, ``score_prompt_ids``) scored by the same engine right after the batch is
generated: on vLLM a follow-up request per CoT with ``logprob_token_ids`` whose prompt blocks are served from
the prefix cache the generation filled, on HF one forward pass per batch. Stage-2 selection
(``generate/select.py``) compares it with the gold score, so a CoT whose own verdict is far off can be dropped
or down-weighted without running the model again.

Instantiated by Ray Data once per actor, or once in-process. With vLLM the whole Ray Data batch goes to the
scheduler at once (continuous batching), so ``generation.batch_size`` is the unit of commit and retry there,
not of padding. A batch that raises is retried row by row (``runtime.pool.RowBatchWorker``) so one bad example
cannot take its neighbours down; a row that still fails, cannot fit its prompt, or yields an empty CoT becomes a
``failed`` record with its reason.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tract_dist.data.encode import DroppedExample, EncodeOptions, fit_prompt
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_scale import derive_score_scale, scale_prompt_ids
from tract_dist.judge.rail import scale_readouts
from tract_dist.runtime.engine import EngineSpec, extract_cot
from tract_dist.runtime.pool import RowBatchWorker
from tract_dist.runtime.sampling import SamplingParams

# Prompts shorter than this after truncation are not worth generating from.
_MIN_PROMPT_BUDGET = 64


def encode_options(opts: dict[str, Any]) -> EncodeOptions:
    return EncodeOptions(max_length=opts["max_length"], truncation=opts.get("truncation", "truncate"),
                         system_prompt=opts.get("system_prompt"), scale=tuple(opts["scale"]),
                         enable_thinking=bool(opts.get("enable_thinking", False)))


class CotWorker(RowBatchWorker):
    """Callable class for ``map_batches``: columns uid, example_id, cot_index, seed, example (JSON) -> records."""

    def __init__(self, engine: dict[str, Any], encode_opts: dict[str, Any], sampling: dict[str, Any],
                 rail_normalize: bool = False):
        from tract_dist.runtime.backend import build_engine

        self.engine = build_engine(EngineSpec.from_dict(engine))
        if hasattr(self.engine, "keep_prompt_cache"):
            # HF: each CoT's read-out reuses its prompt's keys/values from the generate call (only the CoT and
            # the score prefix are computed), as the Judge's does; without it every read-out re-reads the whole
            # prompt, a second prefill (~10 s per batch of 4 Vicuna prompts on one CPU thread).
            self.engine.keep_prompt_cache = True
        self.opts = encode_options(encode_opts)
        self.params = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop", ()))})
        self.score_scale = derive_score_scale(self.engine.tokenizer, self.opts.scale)  # any scale: trie read-out
        self.rail_normalize = rail_normalize

    def _prompt(self, row: dict[str, Any]) -> tuple[list[int], bool]:
        ex = JudgeExample.from_dict(json.loads(row["example"]))
        budget = max(self.opts.max_length - self.params.max_new_tokens, _MIN_PROMPT_BUDGET)
        return fit_prompt(self.engine.tokenizer, ex, budget, self.opts)

    def run_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(rows)
        todo: list[tuple[int, list[int], bool]] = []
        for i, row in enumerate(rows):
            try:
                ids, truncated = self._prompt(row)
                todo.append((i, ids, truncated))
            except DroppedExample as e:
                out[i] = _record(row, status="failed", reason=f"dropped: {e}")
        t0 = time.perf_counter()
        gens = self.engine.generate([t[1] for t in todo], [int(rows[t[0]]["seed"]) for t in todo], self.params)
        secs = time.perf_counter() - t0
        ended = time.time()  # wall clock: comparable across replicas on one machine (pool makespan)
        cots = [extract_cot(g.text, self.params.stop) for g in gens]
        t1 = time.perf_counter()
        reads = self._read([(ids, cot) for (_, ids, _), cot in zip(todo, cots)])
        read_secs = time.perf_counter() - t1
        for (i, ids, truncated), g, cot in zip(todo, gens, cots):
            out[i] = _record(rows[i], status="ok" if cot else "failed", reason=None if cot else "empty_cot",
                             cot=cot, raw_text=g.text, finish_reason=g.finish_reason, prompt_tokens=len(ids),
                             new_tokens=g.new_tokens, truncated=truncated, batch_seconds=secs,
                             batch_end_time=ended, readout_seconds=read_secs, **reads.get(i, {}))
        return [r for r in out if r is not None]

    def _read(self, items: list[tuple[list[int], str]]) -> dict[int, dict[str, Any]]:
        """The RAIL read-out of each non-empty CoT (by position in ``items``): ŷ, the score tokens'
        probabilities and their mass, in one engine call."""
        seqs = {i: ids + scale_prompt_ids(self.engine.tokenizer, cot, self.score_scale)
                for i, (ids, cot) in enumerate(items) if cot}
        if not seqs:
            return {}
        reads = scale_readouts(self.engine, list(seqs.values()), self.score_scale, normalize=self.rail_normalize)
        return {i: {"yhat": r.score, "rail_probs": r.probs, "rail_mass": r.mass} for i, r in zip(seqs, reads)}

    def failed(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        return _record(row, status="failed", reason=reason)


_FIELDS = ("cot", "raw_text", "finish_reason", "prompt_tokens", "new_tokens", "truncated", "batch_seconds",
           "batch_end_time", "yhat", "rail_probs", "rail_mass", "readout_seconds")


def _record(row: dict[str, Any], *, status: str, reason: str | None, **values: Any) -> dict[str, Any]:
    rec = {"uid": row["uid"], "example_id": row["example_id"], "cot_index": int(row["cot_index"]),
           "seed": int(row["seed"]), "attempt": int(row.get("attempt") or 1), "status": status, "reason": reason}
    defaults = {"cot": "", "raw_text": "", "finish_reason": None, "prompt_tokens": 0, "new_tokens": 0,
                "truncated": False, "batch_seconds": 0.0, "batch_end_time": None, "yhat": None, "rail_probs": None,
                "rail_mass": None, "readout_seconds": 0.0}
    rec.update({k: values.get(k, defaults[k]) for k in _FIELDS})
    return rec
