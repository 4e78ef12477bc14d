"""The plan of a run: one entry per stage with its per-device memory, verdict, FLOPs and projected time.

Each stage is built by one small function from the config and the model's shape (:data:`STAGE_BUILDERS`); a new
stage kind (an RL stage, say) adds one builder. Training stages read ``training.*`` as the trainer does; padded
micro-batches are sized at ``data.max_length`` (the worst case the collator can produce), packed ones
(``training.packing``, where the trainer has it) at their token budget.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tract_dist.pipeline.methods import EVAL_MODES
from tract_dist.plan.compute import decode_rate, prefill_seconds, train_step_flops
from tract_dist.plan.hardware import GIB, Accelerator, accelerator
from tract_dist.plan.memory import (
    InferenceSetup,
    MemoryEstimate,
    TrainSetup,
    ZeroBuffers,
    inference_memory,
    training_memory,
)
from tract_dist.plan.shape import LoraShape, ModelShape

if TYPE_CHECKING:
    from tract_dist.config import Config

FITS, TIGHT, NO_FIT, UNCHECKED = "fits", "tight", "does not fit", "not checked"


@dataclass
class StagePlan:
    name: str
    unit: str  # what one memory estimate is for ("per training worker", "per GPU of a generation replica")
    units: int  # workers or replicas
    gpus_per_unit: int
    memory: MemoryEstimate
    limit_bytes: float | None  # the device's memory (None: not checked)
    margin: float
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None
    hard_limit: bool = True  # exceeding the memory is a refusal (training, an engine that cannot start)
    blocked: bool = False  # will not start whatever the total says (vLLM: no room for one max_model_len sequence)

    @property
    def verdict(self) -> str:
        if self.limit_bytes is None:
            return UNCHECKED
        if self.blocked:
            return NO_FIT
        total = self.memory.total
        if total > self.limit_bytes:
            return NO_FIT
        return TIGHT if total > (1 - self.margin) * self.limit_bytes else FITS


@dataclass
class RunPlan:
    model: ModelShape
    lora: LoraShape | None
    device: str  # e.g. "8 x NVIDIA H100 SXM5 80GB (79.19 GiB)" or "CPU"
    accelerator: Accelerator | None
    stages: list[StagePlan]
    assumptions: list[str]

    def failing(self) -> list[StagePlan]:
        return [s for s in self.stages if s.verdict == NO_FIT and s.hard_limit]

    def tight(self) -> list[StagePlan]:
        return [s for s in self.stages if s.verdict in (TIGHT, NO_FIT) and s not in self.failing()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": {**self.model.__dict__, "param_numels": len(self.model.param_numels)},
            "lora": None if self.lora is None else {"trainable": self.lora.trainable, "rank": self.lora.rank},
            "device": self.device,
            "stages": [{"name": s.name, "unit": s.unit, "units": s.units, "gpus_per_unit": s.gpus_per_unit,
                        "verdict": s.verdict, "total_bytes": s.memory.total, "limit_bytes": s.limit_bytes,
                        "components": [c.__dict__ for c in s.memory.components],
                        "phases": s.memory.phases(), "figures": s.figures,
                        "seconds": s.seconds, "notes": s.notes + list(s.memory.notes)} for s in self.stages],
            "assumptions": self.assumptions,
        }


# ---- inputs the stages share -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    cfg: Config
    shape: ModelShape
    lora: LoraShape | None
    acc: Accelerator | None  # None: a CPU run
    examples: int | None

    @property
    def on_gpu(self) -> bool:
        return self.acc is not None

    @property
    def limit(self) -> float | None:
        return self.acc.memory_gib * GIB if self.acc else None


def micro_batch_shape(cfg: Config) -> tuple[int, int]:
    """(rows, tokens per row) of one training micro-batch. Padded rows are as long as the longest sequence, at
    most data.max_length; packed micro-batches (``training.packing`` with ``max_tokens_per_micro_batch``, where the
    trainer has them) are one row of that budget."""
    t = cfg.training
    if getattr(t, "packing", False):
        return 1, getattr(t, "max_tokens_per_micro_batch", None) or t.micro_batch_size * cfg.data.max_length
    return t.micro_batch_size, cfg.data.max_length


def global_batch(cfg: Config) -> int:
    t = cfg.training
    return getattr(t, "global_batch_size", None) or (
        t.micro_batch_size * t.gradient_accumulation_steps * cfg.cluster.num_workers)


def count_records(path: str | None) -> int | None:
    """Records of a local data file without parsing them as examples (JSONL lines, a JSON list, Parquet rows);
    None for hf:NAME, a missing file or another format."""
    if not path or path.startswith("hf:") or not Path(path).is_file():
        return None
    p = Path(path)
    try:
        if p.suffix == ".jsonl":
            with p.open("rb") as fh:
                return sum(1 for line in fh if line.strip())
        if p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(p).metadata.num_rows)
    except (OSError, ValueError):
        return None
    return None


def count_examples(cfg: Config) -> int | None:
    """plan.examples, else the training file's records, capped by data.max_examples."""
    n = cfg.plan.examples if cfg.plan.examples is not None else count_records(cfg.data.train_path)
    if cfg.data.max_examples is not None:
        n = min(n, cfg.data.max_examples) if n is not None else cfg.data.max_examples
    return n


def dtype_bytes(cfg: Config, on_gpu: bool, *, training: bool) -> int:
    """Bytes per weight and activation element: model.dtype as the runtime resolves it (auto: bf16 on GPU, fp32
    on CPU). Training runs DeepSpeed bf16 only for bfloat16 (float16 trains in fp32, as the recipe does)."""
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if training:
        return 2 if dtype == "bfloat16" else 4
    return 4 if dtype == "float32" else 2


def _train_setup(ctx: _Context) -> TrainSetup:
    from tract_dist.train.strategy import build_ds_config

    cfg = ctx.cfg
    rows, seq = micro_batch_shape(cfg)
    b = dtype_bytes(cfg, ctx.on_gpu, training=True)
    try:
        ds = build_ds_config(cfg.training, cfg.cluster.num_workers, bf16=b == 2, gpu=ctx.on_gpu)
    except FileNotFoundError:
        ds = {}
    tile = cfg.loss.tile_mib * 2**20 if cfg.loss.tile_mib else None
    return TrainSetup(world=cfg.cluster.num_workers, zero_stage=cfg.training.zero_stage, param_bytes=b,
                      on_cuda=ctx.on_gpu, rows=rows, seq_len=seq, padded=rows > 1,
                      checkpointing=cfg.model.gradient_checkpointing,
                      loss_rows=max(1, int(cfg.plan.loss_rows_fraction * rows * seq)),
                      buffers=ZeroBuffers.from_ds_config(ds), tile_bytes=tile,
                      triton_loss=cfg.loss.kernel in ("auto", "triton"))


# ---- stage builders ----------------------------------------------------------------------------------------

def _train_stage(ctx: _Context, name: str, examples: int | None) -> StagePlan:
    cfg, shape = ctx.cfg, ctx.shape
    s = _train_setup(ctx)
    mem = training_memory(shape, ctx.lora, s)
    gb = global_batch(cfg)
    mean = cfg.plan.mean_tokens or s.seq_len
    step = train_step_flops(shape, tokens=gb * mean, seq_len=mean,
                            loss_rows=int(cfg.plan.loss_rows_fraction * gb * mean),
                            lora_params=ctx.lora.trainable if ctx.lora else None, checkpointing=s.checkpointing)
    figures: dict[str, Any] = {"micro_batch_tokens": s.tokens, "global_batch": gb, "tokens_per_step": gb * mean,
                               "flops_per_step": step.model, "hardware_flops_per_step": step.hardware,
                               "dtype_bytes": s.param_bytes}
    notes = []
    seconds = None
    steps = None
    if cfg.training.max_steps is not None:
        steps = cfg.training.max_steps
    elif examples:
        steps = max(1, math.ceil(cfg.training.epochs * max(1, math.ceil(examples / gb))))
    if ctx.acc is not None:
        per_step = step.seconds(cfg.cluster.num_workers, ctx.acc.bf16_tflops, cfg.plan.mfu)
        figures["seconds_per_step"] = per_step
        figures["tokens_per_s"] = gb * mean / per_step
        if steps:
            seconds = steps * per_step
    figures["steps"] = steps
    if steps is None:
        notes.append("steps unknown: the training data cannot be counted here (set plan.examples)")
    if shape.experts:
        notes.append(f"mixture of experts: FLOPs on the active parameters ({shape.experts_per_token} of "
                     f"{shape.experts} experts per token); transformers' expert loop under ZeRO-3 (no expert "
                     "parallelism) rarely reaches a dense model's MFU: measure it and set plan.mfu")
    return StagePlan(name, "per training worker", cfg.cluster.num_workers, 1, mem, ctx.limit, cfg.plan.margin,
                     figures, notes, seconds)


def _engine_stage(ctx: _Context, name: str, section: str, *, prompts: int | None, cots: int, concurrency: int,
                  new_tokens: int, readout: bool, replicas: int) -> StagePlan:
    """A generation or judging replica: memory per GPU, and the time to write ``prompts`` x ``cots`` CoTs."""
    cfg, shape = ctx.cfg, ctx.shape
    tp = getattr(cfg, section).tensor_parallel_size
    backend = getattr(cfg, section).backend
    vllm = backend == "vllm" or (backend == "auto" and ctx.on_gpu)
    v = cfg.generation.vllm
    # A sequence is at most the inference context (prompt + CoT); vLLM allocates for max_model_len (default: the
    # model's maximum) and refuses to start when its KV cache cannot hold one sequence of that length.
    seq = getattr(cfg.generation, "max_length", None) or cfg.data.max_length
    engine_len = (v.max_model_len or shape.max_positions or seq) if vllm else seq
    b = dtype_bytes(cfg, ctx.on_gpu, training=False)
    mean = cfg.plan.mean_tokens or seq
    prompt = max(64, min(int(mean * (1 - cfg.plan.loss_rows_fraction)), seq - new_tokens))
    setup = InferenceSetup(backend="vllm" if vllm else "hf", tp=tp, dtype_bytes=b, context=seq,
                           concurrency=concurrency, shared_prefix=prompt if v.enable_prefix_caching else 0,
                           cots_per_prompt=cots, utilization=v.gpu_memory_utilization,
                           kv_cache_bytes=int(v.kv_cache_memory_gb * GIB) if v.kv_cache_memory_gb else None,
                           max_num_seqs=v.max_num_seqs or 1024)
    limit = ctx.limit
    mem, kv = inference_memory(shape, setup, limit or 0.0)
    figures: dict[str, Any] = {"backend": setup.backend, "tensor_parallel": tp, "replicas": replicas,
                               "gpus": replicas * tp if ctx.on_gpu else 0, "concurrency": concurrency,
                               "max_model_len": engine_len, **kv}
    notes = []
    cannot_start = vllm and kv["kv_capacity_tokens"] < engine_len
    if cannot_start:
        notes.append(f"vLLM will not start: its KV cache holds {kv['kv_capacity_tokens']} tokens, less than one "
                     f"sequence of max_model_len {engine_len} (set generation.vllm.max_model_len, e.g. "
                     f"{seq}, or raise {section}.tensor_parallel_size)")
    elif vllm and kv["kv_capacity_tokens"] < kv["kv_needed_tokens"]:
        notes.append(f"the KV cache holds {kv['kv_capacity_tokens']} tokens, {concurrency} sequences need up to "
                     f"{kv['kv_needed_tokens']}: vLLM queues the rest (slower, not a failure)")
    seconds = None
    if ctx.acc is not None and prompts:
        acc = ctx.acc
        rate = decode_rate(shape, tp=tp, dtype_bytes=b, concurrency=concurrency,
                           mean_context=prompt + new_tokens // 2, hbm_tb_s=acc.hbm_tb_s,
                           hbm_efficiency=cfg.plan.hbm_efficiency, peak_tflops=acc.bf16_tflops, mfu=cfg.plan.mfu)
        prefill_tokens = prompts * prompt + (prompts * cots * new_tokens if readout else 0)
        pre = prefill_seconds(shape, tokens=prefill_tokens, seq_len=prompt, gpus=tp, peak_tflops=acc.bf16_tflops,
                              mfu=cfg.plan.mfu)
        decode = prompts * cots * new_tokens / rate.tokens_per_s
        seconds = (pre + decode) / max(replicas, 1)
        figures.update(decode_tokens_per_s_per_replica=rate.tokens_per_s, decode_bound=rate.bound,
                       prefill_seconds=pre / max(replicas, 1), decode_seconds=decode / max(replicas, 1),
                       generated_tokens_bound=prompts * cots * new_tokens)
    if ctx.on_gpu and replicas * tp > cfg.cluster.num_workers:
        notes.append(f"{replicas} replicas x tensor_parallel {tp} = {replicas * tp} GPUs, more than the "
                     f"{cfg.cluster.num_workers} GPUs training uses (cluster.num_workers): set "
                     f"generation.num_replicas")
    unit = "per GPU of a replica" if ctx.on_gpu else "per replica (CPU)"
    return StagePlan(name, unit, replicas, tp, mem, limit, cfg.plan.margin, figures, notes,
                     seconds, blocked=cannot_start)


def _generation_stage(ctx: _Context) -> StagePlan:
    """One work row per (example, CoT): a replica decodes generation.batch_size sequences together, a prompt's
    CoTs sharing its prefix; each CoT's RAIL read-out is a follow-up served from the prefix cache (not counted)."""
    g = ctx.cfg.generation
    replicas = g.num_replicas or ctx.cfg.cluster.num_workers
    return _engine_stage(ctx, "generate", "generation", prompts=ctx.examples, cots=g.num_cots,
                         concurrency=g.batch_size, new_tokens=g.max_new_tokens, readout=False,
                         replicas=replicas)




def _runs_tract_stages(cfg: Config) -> bool:
    """TRACT's stage 1, generation and stage 2 run for ``tract``, and for ``real`` unless ``pipeline.real_init``
    names the export REAL starts from."""
    return cfg.pipeline.method == "tract" or (cfg.pipeline.method == "real" and cfg.pipeline.real_init is None)


def _evaluation_stage(ctx: _Context, *, pipeline: bool) -> StagePlan | None:
    """Judging the benchmarks: one model in ``evaluation.mode`` (``tract-dist evaluate``), or in the pipeline every
    evaluated model (stage 1 too for TRACT with ``pipeline.evaluate_stage1``) in each of its method's modes. Memory
    is the largest mode's; the time is the sum."""
    cfg = ctx.cfg
    e = cfg.evaluation
    if not e.benchmarks:
        return None
    records, unknown = 0, []
    for bench in e.benchmarks:
        n = count_records(bench.path)
        if n is None:
            unknown.append(bench.name)
        else:
            records += max(0, min(n - bench.offset, bench.max_examples or n))
    method = cfg.pipeline.method
    modes = EVAL_MODES[method] if pipeline else (e.mode,)
    models = 2 if pipeline and method == "tract" and cfg.pipeline.evaluate_stage1 else 1
    if pipeline and method == "real":  # REAL's model, plus TRACT's stage 2 (and stage 1) when they run first
        models = 1 + (_runs_tract_stages(cfg) * (1 + cfg.pipeline.evaluate_stage1))
    # num_cots=auto draws 3 CoTs per input at least and max_cots at most: the plan sizes memory and time for the
    # most (a bound), as it does for max_new_tokens.
    n_cots = e.max_cots if e.num_cots == "auto" else e.num_cots
    replicas = cfg.generation.num_replicas or cfg.cluster.num_workers
    runs = []
    for mode in modes:
        cots = 0 if mode == "rail" else n_cots
        runs.append(_engine_stage(ctx, "evaluate", "evaluation", prompts=records or None, cots=max(cots, 1),
                                  concurrency=e.batch_size * max(cots, 1),
                                  new_tokens=cfg.generation.max_new_tokens if cots else 1, readout=mode != "decode",
                                  replicas=replicas))
    stage = max(runs, key=lambda r: r.memory.total)
    if all(r.seconds is not None for r in runs):
        stage.seconds = models * sum(r.seconds for r in runs)  # type: ignore[misc]
    stage.figures.update(benchmark_records=records or None, modes=list(modes), models=models)
    if models * len(modes) > 1:
        stage.notes.append(f"{models} model(s) x {len(modes)} mode(s) ({', '.join(modes)}) judged in turn")
    if e.num_cots == "auto" and any(m != "rail" for m in modes):
        stage.notes.append(f"evaluation.num_cots=auto: sized for evaluation.max_cots {n_cots} CoTs per input "
                           "(the most)")
    if unknown:
        stage.notes.append(f"benchmark sizes unknown here ({', '.join(unknown)}: hf: or missing files): "
                           + ("no time projection" if not records else "not in the time projection"))
    return stage


def _pipeline_training(ctx: _Context) -> list[StagePlan]:
    """The pipeline's training stages: stage 1 (unless ``pipeline.stage1_export`` stands in for it) and, for
    TRACT, stage 2 on one self-generated CoT per CoT drawn (examples x generation.num_cots)."""
    cfg, n = ctx.cfg, ctx.examples
    if cfg.pipeline.method == "real" and not _runs_tract_stages(cfg):
        return []  # REAL from pipeline.real_init: its own stage is not planned (see the plan's notes)
    out = [] if cfg.pipeline.stage1_export else [_train_stage(ctx, "train_stage1", n)]
    if _runs_tract_stages(cfg):
        g = cfg.generation  # select=nearest keeps one CoT per example; the other rules at most every CoT
        per_example = 1 if getattr(g, "select", "all") == "nearest" else g.num_cots
        out.append(_train_stage(ctx, "train_stage2", n * per_example if n else None))
    return out


STAGE_BUILDERS: dict[str, Callable[[_Context], list[StagePlan]]] = {
    "train": lambda ctx: [_train_stage(ctx, "train", ctx.examples)],
    "pipeline_train": _pipeline_training,
    "generate": lambda ctx: [_generation_stage(ctx)] if _runs_tract_stages(ctx.cfg) else [],
    "evaluate": lambda ctx: [s for s in [_evaluation_stage(ctx, pipeline=False)] if s is not None],
    "pipeline_evaluate": lambda ctx: [s for s in [_evaluation_stage(ctx, pipeline=True)] if s is not None],
}
"""Stage kind -> builder. ``train`` is one ``tract-dist train`` run; the pipeline's kinds are ``pipeline_train``,
``generate`` and ``pipeline_evaluate`` (:data:`tract_dist.plan.check.COMMAND_KINDS`)."""


def _selected(cfg: Config, stages: list[StagePlan]) -> list[StagePlan]:
    """The stages ``pipeline.stages`` selects (its fnmatch patterns; the plan's ``evaluate`` stands for every
    ``evaluate_*`` stage of the pipeline)."""
    import fnmatch

    wanted = getattr(cfg.pipeline, "stages", None)
    if not wanted:
        return stages
    return [s for s in stages if any(fnmatch.fnmatchcase(s.name, p) or (
        s.name == "evaluate" and fnmatch.fnmatchcase("evaluate_", p[:9])) for p in wanted)]


# ---- the plan ----------------------------------------------------------------------------------------------

def plan_run(cfg: Config, *, kinds: tuple[str, ...] = ("pipeline_train", "generate", "pipeline_evaluate")) -> RunPlan:
    """The plan of ``cfg`` for the stage kinds asked (``train`` for a training run; default: the pipeline), from the
    model's config alone (meta device). Raises :class:`~tract_dist.plan.shape.PlanUnavailable` when the model's
    config cannot be had without a download."""
    from tract_dist.plan.shape import build_meta, lora_shape, model_shape, resolve_config

    config, source = resolve_config(cfg)
    meta = build_meta(config)
    shape = model_shape(config, name=cfg.model.name_or_path, source=source, model=meta)
    lora = lora_shape(meta, cfg.model.lora, config) if cfg.model.lora.enabled else None
    acc = accelerator(cfg.plan.gpu, cfg.plan.gpu_memory_gib) if cfg.cluster.use_gpu else None
    ctx = _Context(cfg, shape, lora, acc, count_examples(cfg))
    stages = [st for kind in kinds for st in STAGE_BUILDERS[kind](ctx)]
    if "pipeline_train" in kinds:
        stages = _selected(cfg, stages)
    device = (f"{cfg.cluster.num_workers} x {acc.name} ({acc.memory_gib:.2f} GiB)" if acc else
              f"CPU ({cfg.cluster.num_workers} worker(s); memory not checked)")
    return RunPlan(shape, lora, device, acc, stages, _assumptions(cfg, acc))


def _assumptions(cfg: Config, acc: Accelerator | None) -> list[str]:
    p = cfg.plan
    out = []
    if acc is not None:
        out.append(f"{acc.name}: {acc.bf16_tflops:g} TFLOP/s dense bf16, {acc.hbm_tb_s:g} TB/s ({acc.source})")
        out.append(f"training and prefill at MFU {p.mfu:g} (plan.mfu); decoding at {p.hbm_efficiency:g} of peak "
                   "bandwidth (plan.hbm_efficiency)")
    mean = p.mean_tokens or cfg.data.max_length
    out.append(f"{mean} tokens per sequence ({'plan.mean_tokens' if p.mean_tokens else 'data.max_length, the bound'}"
               f"); the loss reads {p.loss_rows_fraction:g} of them (plan.loss_rows_fraction)")
    out.append("generation writes generation.max_new_tokens per CoT (the bound: CoTs stop earlier)")
    out.append(f"'tight' above {1 - p.margin:.0%} of device memory (plan.margin), refused above all of it")
    if cfg.pipeline.method == "real":
        out.append("pipeline.method=real: train_real (REAL's rollout engines beside its training workers) is not "
                   "planned; its training step is sized like stage 2's, plus the engines' weights")
    return out


# ---- text --------------------------------------------------------------------------------------------------

def render(plan: RunPlan) -> str:
    m, lines = plan.model, []
    moe = f", {m.experts} experts ({m.experts_per_token} per token)" if m.experts else ""
    lines.append(f"model   {m.name} ({m.source})")
    lines.append(f"        {m.params / 1e9:.3f}B parameters: {m.layers} layers, hidden {m.hidden}, heads "
                 f"{m.heads}/{m.kv_heads} x {m.head_dim}, intermediate {m.intermediate}, vocabulary {m.vocab}{moe}")
    if plan.lora is not None:
        lines.append(f"        LoRA r {plan.lora.rank}: {plan.lora.trainable / 1e6:.1f}M trainable "
                     f"({plan.lora.trainable / m.params:.2%})")
    lines.append(f"device  {plan.device}")
    for s in plan.stages:
        lines.append("")
        gpus = f", {s.units} x {s.gpus_per_unit} GPU" if s.gpus_per_unit > 1 else f", {s.units} unit(s)"
        lines.append(f"{s.name}  ({s.unit}{gpus})")
        for c in s.memory.components:
            name = f"{c.name} [{c.phase}]" if c.phase else c.name
            lines.append(f"  {name:<52} {c.bytes / GIB:9.2f} GiB   {c.how}")
        limit = f" of {s.limit_bytes / GIB:.2f} GiB" if s.limit_bytes else ""
        phases = s.memory.phases()
        peak = ("  (peak: the unmarked + max(activations + max(loss head, layer backward), optimizer step); "
                + ", ".join(f"{k} {v / GIB:.2f}" for k, v in phases.items()) + ")") if phases else ""
        lines.append(f"  {'total':<52} {s.memory.total / GIB:9.2f} GiB{limit}  -> {s.verdict}{peak}")
        f = s.figures
        if "flops_per_step" in f:
            lines.append(f"  step: {f['tokens_per_step']} tokens, {f['flops_per_step']:.3g} FLOPs "
                         f"({f['hardware_flops_per_step']:.3g} with recomputation)"
                         + (f", {f['seconds_per_step']:.2f} s ({f['tokens_per_s']:.0f} tokens/s)"
                            if "seconds_per_step" in f else "")
                         + (f"; {f['steps']} steps" if f.get("steps") else ""))
        if "decode_tokens_per_s_per_replica" in f:
            lines.append(f"  decode: {f['decode_tokens_per_s_per_replica']:.0f} tokens/s per replica "
                         f"({f['decode_bound']} bound, {f['concurrency']} sequences); KV "
                         f"{f['kv_bytes_per_token'] / 1024:.0f} KiB per token per GPU, holds "
                         f"{f['kv_capacity_tokens']} tokens")
        if s.seconds is not None:
            lines.append(f"  projected wall-clock: {_duration(s.seconds)}")
        for note in s.notes + list(s.memory.notes):
            lines.append(f"  note: {note}")
    total = [s.seconds for s in plan.stages if s.seconds is not None]
    if total and len(total) == len(plan.stages):
        lines.append("")
        lines.append(f"all stages: {_duration(sum(total))}")
    lines.append("")
    lines.append("assumptions: " + "; ".join(plan.assumptions))
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def host_memory_bytes() -> int:
    """This machine's physical memory (for CPU runs, which are only warned about)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
