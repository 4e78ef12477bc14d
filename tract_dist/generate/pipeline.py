"""``generate_cots``: the stage between stage 1 and stage 2. The stage-1 model writes CoTs for every training prompt.

Flow: read the training set -> one work row per (example, CoT index) with a seed derived from its id -> drop
rows whose uid is already resolved in a committed shard (generated, failed for good, or out of attempts) ->
map the rest through the replica pool (each CoT read out by RAIL in the same engine: its ŷ is stored with it,
for stage-2 selection) -> commit results as shards of ``generation.shard_size`` -> retry rows
that failed with an error, up to ``generation.max_attempts`` in all -> summarise (counts, failures by reason,
throughput) -> MLflow. One invocation per output folder at a time (a lock beside it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tract_dist.console import CONSOLE
from tract_dist.data.formats import read_examples
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_tokens import parse_scale
from tract_dist.generate.shards import ShardStore, cot_uid, retryable
from tract_dist.generate.spec import GenerateSpec, inference_max_length
from tract_dist.generate.worker import CotWorker
from tract_dist.runtime.pool import PoolSpec, ensure_ray, map_rows
from tract_dist.runtime.sampling import SamplingParams, example_seed

if TYPE_CHECKING:
    from tract_dist.config import DataSection, EvaluationSection

log = logging.getLogger(__name__)


__all__ = ["GenerateSpec", "generate_cots", "generation_settings", "inference_max_length", "judge_rail_normalize",
           "load_training_examples", "work_rows", "worker_kwargs"]


def load_training_examples(d: DataSection) -> list[JudgeExample]:
    """The prompts to generate for: ``data.train_path`` in ``data.train_format`` (feedback not required)."""
    if not d.train_path:
        from tract_dist.config import ConfigError

        raise ConfigError("data.train_path: required to generate CoTs")
    if d.task == "relative":
        from tract_dist.config import ConfigError

        raise ConfigError("data.task relative: stage-1 generation and the stage-2 builder write absolute-grading "
                          "CoTs only so far; train a relative judge with tract-dist train or pipeline.method "
                          "cot_raft, ce_cot or raft")
    result = read_examples(d.train_path, d.train_format, scale=parse_scale(d.scale), skip_invalid=d.skip_invalid,
                           require_feedback=False, limit=d.max_examples, split=d.split)
    if result.invalid:
        log.info(f"generate: skipped {len(result.invalid)} invalid records of {d.train_path}", extra=CONSOLE)
    return result.examples


def work_rows(examples: list[JudgeExample], num_cots: int, seed: int) -> list[dict[str, Any]]:
    """One row per (example, CoT index): its stable uid, its seed, and the example as JSON."""
    rows = []
    for ex in examples:
        payload = json.dumps(ex.to_dict(), ensure_ascii=False)
        for j in range(num_cots):
            rows.append({"uid": cot_uid(ex.id, j), "example_id": ex.id, "cot_index": j,
                         "seed": example_seed(seed, ex.id, j), "example": payload})
    return rows


def worker_kwargs(gen: GenerateSpec, model_path: str, backend: str, sampling: SamplingParams,
                  spec: PoolSpec, rail_normalize: bool = False) -> dict[str, Any]:
    """Constructor arguments for a replica (plain data: they are pickled to every Ray actor)."""
    from tract_dist.runtime.backend import engine_spec

    d, g = gen.data, gen.generation
    engine = engine_spec(gen.model, g.vllm, model_path, backend, tensor_parallel_size=g.tensor_parallel_size,
                         batch_size=spec.batch_size, torch_threads=spec.torch_threads())
    return {
        "engine": engine.as_dict(),
        "encode_opts": {"max_length": gen.max_length, "truncation": d.truncation,
                        "system_prompt": d.system_prompt,
                        "scale": list(parse_scale(d.scale)), "enable_thinking": d.enable_thinking},
        "sampling": sampling.as_dict(),
        "rail_normalize": rail_normalize,
    }


class _Progress:
    """A tqdm bar over CoTs with prompts/s and generated tokens/s.

    End-to-end rates count from the start (model loading included); steady rates count from the first finished
    batch, so they measure generation alone once the replicas are up.
    """

    def __init__(self, total: int, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="generate", unit="cot", disable=not show, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.first: tuple[float, int, int] | None = None
        self.done = 0
        self.tokens = 0

    def update(self, records: list[dict[str, Any]]) -> None:
        self.done += len(records)
        self.tokens += sum(int(r["new_tokens"]) for r in records)
        if self.first is None:
            self.first = (time.perf_counter(), self.done, self.tokens)
        s = self.stats()
        self.bar.set_postfix(prompts_s=f"{s['prompts_per_s']:.2f}", tok_s=f"{s['tokens_per_s']:.1f}", refresh=False)
        self.bar.update(len(records))

    def stats(self) -> dict[str, float]:
        now = time.perf_counter()
        secs = max(now - self.start, 1e-9)
        out = {"seconds": secs, "prompts_per_s": self.done / secs, "tokens_per_s": self.tokens / secs,
               "generated_this_run": self.done, "generated_tokens_this_run": self.tokens}
        if self.first is not None and now - self.first[0] > 0 and self.done > self.first[1]:
            steady = now - self.first[0]
            out["steady_prompts_per_s"] = (self.done - self.first[1]) / steady
            out["steady_tokens_per_s"] = (self.tokens - self.first[2]) / steady
        return out


def judge_rail_normalize(evaluation: EvaluationSection, model_path: str) -> bool:
    """How each CoT's ŷ is read: as the stage-1 model's judge reads it (``evaluation.rail_normalize``, or what
    its export records training used), so selection compares with y* the number that model's judge gives."""
    from tract_dist.export_record import resolve_rail_normalize

    return resolve_rail_normalize(evaluation.rail_normalize, model_path)


def generation_settings(gen: GenerateSpec, model_path: str, backend: str, sampling: SamplingParams,
                        fingerprint: str | None = None) -> dict[str, Any]:
    """What the CoTs of a folder depend on. The model is identified by the content hash of its files (a
    retrained model at the same path is another model), the path kept for people; ``fingerprint`` is the
    pipeline stage's, or a hash of these settings. How ŷ is read is not among them: every record keeps the score
    tokens' probabilities, from which selection reads ŷ the way the stage-1 judge does (folders made before the
    read-out existed keep their fingerprint; their records carry none)."""
    from tract_dist.identity import content_fingerprint, json_digest
    from tract_dist.storage import local_copy

    local = local_copy(str(model_path)) or str(model_path)  # a URI: this node's verified copy is what is hashed
    settings = {"model": str(model_path), "model_sha256": content_fingerprint(local), "backend": backend,
                "sampling": sampling.as_dict(), "seed": gen.generation.seed, "max_length": gen.max_length,
                "system_prompt": gen.data.system_prompt, "scale": gen.data.scale}
    if gen.data.enable_thinking:  # only when on: folders generated before the switch existed keep their identity
        settings["enable_thinking"] = True
    ident = {k: v for k, v in settings.items() if k != "model" or settings["model_sha256"] is None}
    settings["fingerprint"] = fingerprint or json_digest(ident, 12)
    return settings


def generate_cots(gen: GenerateSpec, model_path: str | None, out_dir: str | Path | None = None, *,
                  examples: list[JudgeExample] | None = None, parent_run: Any = None,
                  show_progress: bool = True, fingerprint: str | None = None, fresh: bool = False,
                  mirror: str | None = None) -> dict[str, Any]:
    """Generate ``generation.num_cots`` CoTs per training example into sharded JSONL; resume what is missing.

    ``gen``: the config's sections generation reads (``GenerateSpec.of(cfg)``). ``model_path`` is the stage-1
    export (an HF folder or alias; None: ``model.name_or_path``). Returns the
    summary also written to ``out_dir/summary.json``: expected/ok/failed counts, failure reasons, duplicates
    and missing (both 0 on a complete run), throughput of this run. A folder holding CoTs made with other
    settings is refused naming both fingerprints, or with ``fresh`` moved aside first. ``mirror`` (a URI,
    :func:`tract_dist.storage.mirror_of`): the folder's copy on shared storage; the shards it has and the local
    folder lacks are fetched before resuming, each new shard is uploaded as it is committed, the settings,
    failures and summary when written.
    """
    from tract_dist.fsutil import exclusive_lock
    from tract_dist.runtime.backend import choose_backend

    from tract_dist import console

    model_path = model_path or gen.model.name_or_path
    out = Path(out_dir or gen.default_output_dir)
    examples = examples if examples is not None else load_training_examples(gen.data)
    with exclusive_lock(out, "generation folder"):
        if fresh and out.exists():
            moved = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out, moved)
            log.info(f"generate: --fresh: moved {out} to {moved}", extra=CONSOLE)
        if fresh and mirror:  # else the next sync would fetch the old shards back (the local copy is kept above)
            from tract_dist.storage import filesystem

            fs, inner = filesystem(mirror)
            fs.delete_dir_contents(inner, missing_dir_ok=True)
            log.info(f"generate: --fresh: removed the old shards from {mirror}", extra=CONSOLE)
        # A quiet console (a pipeline's stage keeps the pipeline's): library chatter to OUT/logs/driver.log.
        with console.quiet_run(out / "logs"):
            # before any replica starts: a bad choice is a config error
            backend = choose_backend(gen.generation, "generation", use_gpu=gen.cluster.use_gpu)
            return _generate_locked(gen, str(model_path), out, examples, backend, parent_run, show_progress,
                                    fingerprint, mirror)


def _mirrored(name: str) -> bool:
    """What of a generation folder is mirrored as immutable: committed shards and the settings they were made with
    (not logs, temporary files or the summary a rerun rewrites)."""
    from fnmatch import fnmatchcase

    from tract_dist.generate.shards import SETTINGS, SHARD_GLOB

    return name == SETTINGS or ("/" not in name and fnmatchcase(name, SHARD_GLOB))


def _generate_locked(gen: GenerateSpec, model_path: str, out: Path, examples: list[JudgeExample], backend: Any,
                     parent_run: Any, show_progress: bool, fingerprint: str | None,
                     mirror: str | None = None) -> dict[str, Any]:
    from tract_dist.export_record import resolve_rail_normalize
    from tract_dist.generate.shards import FAILURES, SETTINGS, SUMMARY
    from tract_dist.storage import for_replicas, join, local_copy, push_dir, put_file
    from tract_dist.tracking import log_artifact, log_metrics, log_params, start_run
    from tract_dist.tracking.mlflow_run import artifact_root

    g = gen.generation
    sampling = SamplingParams.from_config(g)
    rows = work_rows(examples, g.num_cots, g.seed)
    expected = {r["uid"] for r in rows}

    store = ShardStore(out)
    store.remove_stale()
    if mirror:  # resume from what the shared copy holds, whichever node wrote it
        from tract_dist.storage import sync_missing

        fetched, uploaded = sync_missing(out, mirror, _mirrored)
        if fetched or uploaded:
            log.info(f"generate: {fetched} files fetched from {mirror}, {uploaded} uploaded to it", extra=CONSOLE)
    store.check_settings(generation_settings(gen, model_path, backend.backend, sampling, fingerprint))
    if mirror:
        put_file(out / SETTINGS, join(mirror, SETTINGS))
    state = store.latest()
    resolved = store.resolved_uids(g.max_attempts)
    done = resolved
    todo = [{**r, "attempt": state[r["uid"]]["attempts"] + 1 if r["uid"] in state else 1}
            for r in rows if r["uid"] not in resolved]
    retrying = sum(1 for r in todo if r["attempt"] > 1)
    if retrying:
        log.info(f"generate: retrying {retrying} CoTs that failed with an error before", extra=CONSOLE)
    spec = PoolSpec.from_cluster(gen.cluster, use_ray=g.ray, batch_size=g.batch_size, replicas=g.num_replicas,
                                 gpus_per_replica=g.tensor_parallel_size)

    def commit(records: list[dict[str, Any]]) -> None:
        shard = store.write_shard(records)
        if mirror:  # after the local commit: a shard on the URI is always a whole, committed one
            put_file(shard, join(mirror, shard.name))

    t = gen.tracking
    with start_run(t.tracking_uri, t.experiment, t.run_name or "generate", enabled=t.enabled, parent=parent_run,
                   tags={"stage": "generate"}, artifact_root=artifact_root(gen.cluster, gen.tracking)) as run:
        log_params(run, {"model_path": model_path, "output_dir": str(out), "examples": len(examples),
                         "num_cots": g.num_cots, "already_done": len(done), "to_generate": len(todo),
                         "use_ray": spec.use_ray, "replicas": spec.replicas, "batch_size": spec.batch_size,
                         "backend": backend.backend, "backend_reason": backend.reason,
                         "tensor_parallel_size": g.tensor_parallel_size,
                         **{f"sampling.{k}": v for k, v in sampling.as_dict().items()}})
        local = local_copy(model_path)  # a URI: this node's verified copy, for what the driver reads itself
        if Path(local).is_dir():  # the stage-1 export's logged model is this run's input
            from tract_dist.tracking.models import link_model_input

            link_model_input(run, local)
        if spec.use_ray and todo:
            ensure_ray(spec)  # before the progress bar: Ray's start-up line is not drawn into it
        progress = _Progress(len(todo), show_progress)
        step = 0
        try:
            # An alias with GGUF weights is converted once here, not by every replica at once.
            kwargs = worker_kwargs(gen, for_replicas(str(model_path)), backend.backend, sampling, spec,
                                   resolve_rail_normalize(gen.rail_normalize, local))
            while todo:
                buffer: list[dict[str, Any]] = []
                try:
                    for records in map_rows(todo, CotWorker, kwargs, spec):
                        buffer += records
                        progress.update(records)
                        while len(buffer) >= g.shard_size:
                            commit(buffer[:g.shard_size])
                            buffer = buffer[g.shard_size:]
                            step += 1
                            log_metrics(run, progress.stats(), step=step)
                finally:
                    if buffer:  # whole records only: committing them on an exception loses and duplicates nothing
                        commit(buffer)
                # Rows that raised get another pass (up to max_attempts in all, across runs).
                failed = {r["uid"]: r for r in store.latest().values()
                          if retryable(r) and r["attempts"] < g.max_attempts}
                todo = [{**r, "attempt": failed[r["uid"]]["attempts"] + 1} for r in rows if r["uid"] in failed]
                if todo:
                    log.info(f"generate: retrying {len(todo)} CoTs that failed with an error", extra=CONSOLE)
        finally:
            progress.bar.close()
        summary = store.finalize(expected, {"this_run": progress.stats(), "output_dir": str(out),
                                            "backend": backend.backend}, max_attempts=g.max_attempts)
        log_metrics(run, {"ok": summary["ok"], "failed": summary["failed"], "missing": summary["missing"],
                          "duplicates": summary["duplicates"], **progress.stats()}, step=step + 1)
        if mirror:
            push_dir(out, mirror, lambda n: n in (SUMMARY, FAILURES))
        for name in (SUMMARY, FAILURES, SETTINGS):
            log_artifact(run, out / name, "generate")
    return summary

