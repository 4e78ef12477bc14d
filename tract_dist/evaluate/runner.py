"""``evaluate_model``: judge every configured benchmark, then write predictions, metrics and a scatter plot.

Per benchmark ``{out_dir}/{name}/``: ``predictions.jsonl`` (id, prediction, gold, category, failure, detail),
``metrics.json`` (overall + per category) and ``scatter.png``; all logged to one MLflow run (a child of the
pipeline's run when ``parent_run`` is given) with metrics named ``{benchmark}.{metric}`` and each benchmark
as a dataset input (digest over the examples scored).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tract_dist import jsontext
from tract_dist.console import CONSOLE
from tract_dist.data.formats import read_examples
from tract_dist.data.schema import DataError, JudgeExample
from tract_dist.data.score_tokens import parse_scale
from tract_dist.evaluate.metrics import evaluate_predictions, flat_metrics
from tract_dist.evaluate.plots import scatter_plot
from tract_dist.evaluate.spec import EvaluateSpec
from tract_dist.evaluate.worker import JudgeWorker, PairWorker
from tract_dist.fsutil import atomic_write_json, atomic_write_jsonl
from tract_dist.runtime.pool import PoolSpec, ensure_ray, map_rows

log = logging.getLogger(__name__)


def is_relative(spec: Any) -> bool:
    """A benchmark of pairs (accuracy and the position-swap check) rather than of single responses."""
    from tract_dist.config import PAIRWISE_BENCHMARK_FORMATS

    return spec.format in PAIRWISE_BENCHMARK_FORMATS


def load_pair_benchmark(spec: Any, skip_invalid: bool = False) -> list[Any]:
    """A relative benchmark's pairs (``vicuna-pairs``: an absolute prometheus-eval file paired by gold-score
    difference, ``data.pair_formats.read_vicuna_pairs``), then ``offset`` / ``max_examples``."""
    from tract_dist.data.pair_formats import read_pairs, read_vicuna_pairs

    if spec.format == "vicuna-pairs":
        pairs = read_vicuna_pairs(spec.path)
    else:
        pairs, invalid = read_pairs(spec.path, spec.format, skip_invalid=skip_invalid, require_feedback=False,
                                    split=spec.split)
        if invalid:
            log.info(f"evaluate: {spec.name}: skipped {len(invalid)} invalid records of {spec.path}", extra=CONSOLE)
    end = None if spec.max_examples is None else spec.offset + spec.max_examples
    return pairs[spec.offset:end]


def load_benchmark(spec: Any, scale: tuple[int, int], skip_invalid: bool = False) -> list[JudgeExample]:
    """A benchmark's examples: a local file or ``hf:NAME`` (prometheus-eval label = mean of gpt4_score)."""
    res = read_examples(spec.path, spec.format, scale=scale, skip_invalid=skip_invalid, require_feedback=False,
                        limit=spec.max_examples, split=spec.split, offset=spec.offset)
    if res.invalid:
        log.info(f"evaluate: {spec.name}: skipped {len(res.invalid)} invalid records of {spec.path}", extra=CONSOLE)
    return res.examples


def predict(ev: EvaluateSpec, model_path: str, examples: list[Any], *, rail_normalize: bool,
            show_progress: bool = True, desc: str = "evaluate", backend: str = "hf",
            relative: bool = False) -> list[dict[str, Any]]:
    """Prediction rows for ``examples`` (input order) through the judge pool (Ray Data or in-process) on
    ``backend`` (resolved: hf or vllm), reading ŷ as ``rail_normalize`` says (resolved once by the caller);
    ``relative``: ``examples`` are pairs, judged in both orders."""
    from tqdm.auto import tqdm

    from tract_dist.judge.judge import judge_kwargs
    from tract_dist.runtime.backend import engine_spec
    from tract_dist.storage import for_replicas

    e = ev.evaluation
    spec = PoolSpec.from_cluster(ev.cluster, use_ray=e.ray, batch_size=e.batch_size,
                                 replicas=ev.generation.num_replicas, gpus_per_replica=e.tensor_parallel_size)
    kw = judge_kwargs(ev.data, ev.generation, e, rail_normalize=rail_normalize)
    kw["sampling"] = kw["sampling"].as_dict()
    engine = engine_spec(ev.model, ev.generation.vllm, for_replicas(model_path), backend,
                         tensor_parallel_size=e.tensor_parallel_size, batch_size=e.batch_size,
                         torch_threads=spec.torch_threads())
    worker_kwargs = {"engine": engine.as_dict(), "judge_kwargs": kw, "n_cots": e.num_cots, "mode": e.mode}
    column, worker = ("pair", PairWorker) if relative else ("example", JudgeWorker)
    rows = [{"id": ex.id, column: json.dumps(ex.to_dict(), ensure_ascii=False)} for ex in examples]
    got: dict[str, dict[str, Any]] = {}
    t0, first = time.perf_counter(), None
    if spec.use_ray and rows:
        ensure_ray(spec)  # before the progress bar: Ray's start-up line is not drawn into it
    with tqdm(total=len(rows), desc=desc, unit="ex", disable=not show_progress) as bar:
        for batch in map_rows(rows, worker, worker_kwargs, spec):
            first = first if first is not None else time.perf_counter() - t0
            for p in batch:
                for key in ("prediction", "swapped") if relative else ("prediction",):
                    pred = p[key]
                    p[key] = None if pred is None or (isinstance(pred, float) and math.isnan(pred)) else pred
                p["detail"] = json.loads(p["detail"]) if p["detail"] else {}
                got[p["id"]] = p
            bar.update(len(batch))
    missing = [ex.id for ex in examples if ex.id not in got]
    if missing:  # the pool maps every row to one result; anything else is a bug worth stopping for
        raise RuntimeError(f"evaluation lost {len(missing)} predictions (first ids: {missing[:5]})")
    # Where the time went (the benchmark reads it): the first result waits for the pool's start-up and model
    # loading as well as its batch; the rest is judging.
    LAST_TIMING.update(seconds=round(time.perf_counter() - t0, 3), seconds_to_first_result=round(first or 0.0, 3),
                       rows=len(rows), use_ray=spec.use_ray, replicas=spec.replicas)
    return [got[ex.id] for ex in examples]


LAST_TIMING: dict[str, Any] = {}  # predict()'s last timing, written beside the predictions (timing.json)


def write_predictions(records: list[dict[str, Any]], path: str | Path) -> Path:
    """predictions.jsonl, replaced atomically and durably: the record of every judgement, which
    :func:`load_predictions` reads back to recompute metrics and plots."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, records)
    return path


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions.jsonl (needs ``prediction`` — null when failed — and ``gold`` on every line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                r = jsontext.loads(line)
            except json.JSONDecodeError as e:  # deep nesting too (jsontext)
                raise DataError(str(path), f"not valid JSON: {e}", index=i) from None
            for key in ("prediction", "gold"):
                if key not in r:
                    raise DataError(str(path), "missing", index=i, field_name=key)
            out.append(r)
    return out


def report(records: list[dict[str, Any]], out_dir: str | Path, name: str,
           scale: tuple[int, int] = (1, 5), relative: bool = False) -> dict[str, Any]:
    """Metrics (overall and per category) + metrics.json + scatter.png for one benchmark's predictions; a
    relative benchmark's are accuracy and the position-swap check (``evaluate.pairwise``), without a plot."""
    from tract_dist.evaluate.pairwise import evaluate_pair_predictions

    out = Path(out_dir)
    result = evaluate_pair_predictions(records) if relative else evaluate_predictions(records)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", result)  # a reader (compare, a rerun) never sees half of it
    if not relative:
        scatter_plot(records, out / "scatter.png", name, scale)
    return result


def evaluate_model(ev: EvaluateSpec, model_path: str | None, out_dir: str | Path | None = None,
                   parent_run: Any = None, *, show_progress: bool = True,
                   tags: dict[str, str] | None = None, mirror: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_path`` on every ``evaluation.benchmarks`` entry; returns ``{benchmark: metrics}``.

    ``ev``: the config's sections evaluation reads (``EvaluateSpec.of(cfg)``). ``tags`` are added to the MLflow
    run (the pipeline tags method, model, stage and benchmark for compare). ``mirror`` (a URI,
    :func:`tract_dist.storage.mirror_of`): where the outputs (not the logs) are uploaded once written, replacing
    an earlier evaluation's."""
    from tract_dist import console
    from tract_dist.config import ConfigError

    e = ev.evaluation
    if not e.benchmarks:
        raise ConfigError("evaluation.benchmarks: no benchmark to evaluate on")
    out = Path(out_dir or ev.default_output_dir)
    # A quiet console (a pipeline's stage keeps the pipeline's): library chatter to OUT/logs/driver.log.
    with console.quiet_run(out / "logs"):
        results = _evaluate(ev, model_path, out, parent_run, show_progress, tags)
    if mirror:
        from tract_dist.storage import push_dir

        push_dir(out, mirror, lambda name: not name.startswith("logs/"))
    return results


def _evaluate(ev: EvaluateSpec, model_path: str | None, out: Path, parent_run: Any, show_progress: bool,
              tags: dict[str, str] | None) -> dict[str, Any]:
    from tract_dist.export_record import resolve_rail_normalize
    from tract_dist.runtime.backend import choose_backend
    from tract_dist.storage import local_copy
    from tract_dist.tracking import log_artifact, log_metrics, log_params, start_run
    from tract_dist.tracking.datasets import EVALUATION, examples_dataset, log_datasets
    from tract_dist.tracking.mlflow_run import artifact_root

    e, t = ev.evaluation, ev.tracking
    choice = choose_backend(e, "evaluation", use_gpu=ev.cluster.use_gpu)  # before any replica starts
    model_path = model_path or ev.model.name_or_path
    local = local_copy(model_path)  # a URI: this node's verified copy, for what the driver reads itself
    # Resolved once, here: the export's training choice unless set (every benchmark's judge reads ŷ so).
    rail = resolve_rail_normalize(e.rail_normalize, local)
    scale = parse_scale(ev.data.scale)
    results: dict[str, Any] = {}
    with start_run(t.tracking_uri, t.experiment, t.run_name or "evaluate", enabled=t.enabled, parent=parent_run,
                   tags={**(tags or {}), "stage": "evaluate"}, artifact_root=artifact_root(ev.cluster, ev.tracking)) as run:
        log_params(run, {"model_path": model_path, "mode": e.mode, "num_cots": e.num_cots,
                         **({"cot_se_target": e.cot_se_target, "max_cots": e.max_cots} if e.num_cots == "auto" else {}),
                         "rail_normalize": rail, "use_ray": e.ray, "backend": choice.backend,
                         "backend_reason": choice.reason, "tensor_parallel_size": e.tensor_parallel_size,
                         "benchmarks": ",".join(b.name for b in e.benchmarks)})
        # The MLflow 3 logged model of the weights scored (a training run logged it): this run's input, and the
        # model its metrics are filed under, so the Models tab shows each export's results per benchmark.
        from tract_dist.tracking.models import link_model_input

        model_id = link_model_input(run, local) if Path(str(local)).is_dir() else None
        for spec in e.benchmarks:
            relative = is_relative(spec)
            examples = (load_pair_benchmark(spec, ev.data.skip_invalid) if relative
                        else load_benchmark(spec, scale, ev.data.skip_invalid))
            dataset = examples_dataset(spec.name, spec.path, examples, EVALUATION)
            log_datasets(run, [dataset])
            records = predict(ev, str(model_path), examples, rail_normalize=rail, show_progress=show_progress,
                              desc=spec.name, backend=choice.backend, relative=relative)
            bdir = out / spec.name
            write_predictions(records, bdir / "predictions.jsonl")
            atomic_write_json(bdir / "timing.json", dict(LAST_TIMING))
            result = report(records, bdir, spec.name, scale, relative=relative)
            results[spec.name] = result
            log_metrics(run, flat_metrics(spec.name, result), model_id=model_id,
                        dataset=(dataset.name, dataset.digest) if model_id else None)
            for f in ("predictions.jsonl", "metrics.json") + (() if relative else ("scatter.png",)):
                log_artifact(run, bdir / f, f"evaluate/{spec.name}")
        atomic_write_json(out / "summary.json", results)
    return results
