"""Typed, validated configuration: YAML (safe_load) + dotted ``section.key=value`` overrides.

Every error names the file (or "override") and the dotted key, so a typo in a 200-line config is found at
once instead of surfacing as a worker crash an hour into a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tract_dist.data.prompts import ABS_SYSTEM_PROMPT
from tract_dist.data.score_tokens import MAX_SCALE_VALUES


class ConfigError(ValueError):
    """Invalid configuration; the message names the source and the dotted key."""


# Names that become folder names (runs, benchmarks, pipelines): one path component, no "..", no separators.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_BIG = 1 << 20  # upper bound for counts where anything larger is a typo (tokens, batch sizes, steps per save)


class _Section(BaseModel):
    # allow_inf_nan=False: a float key given as .inf or .nan (YAML) is rejected, never trained with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSection(_Section):
    enabled: bool = False
    r: int = Field(16, gt=0, le=4096)
    alpha: float = Field(32.0, gt=0, le=1e6)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_export: bool = True  # later stages (generation, judge) load export/model


class ModelSection(_Section):
    name_or_path: str
    tokenizer: str | None = None  # defaults to the model's own
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: str | None = None  # None: flash_attention_2 when importable on CUDA, else sdpa
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraSection = LoraSection()


class DataSection(_Section):
    train_path: str | None = None  # local file or hf:NAME
    train_format: Literal["feedback-collection", "prometheus-eval", "jsonl"] = "feedback-collection"
    split: str = "train"
    max_length: int = Field(3000, ge=64, le=1 << 24)
    truncation: Literal["truncate", "drop"] = "truncate"
    skip_invalid: bool = False
    max_examples: int | None = Field(None, gt=0)
    scale: str = Field("1-5", pattern=r"^\d{1,6}-\d{1,6}$")
    system_prompt: str | None = ABS_SYSTEM_PROMPT
    use_cot: bool = True  # False: score-only targets (the RAFT baseline without CoT)


class LossSection(_Section):
    """The CoT-RAFT loss; built once into :class:`tract_dist.loss.CoTRaftLossOptions`."""

    lam: float = Field(1.0, ge=0, le=1e6, description="weight of the MSE term: ce + lam * mse")
    rail_normalize: bool = Field(False, description="score distribution over the K score tokens only")
    ce_on_score_token: bool = Field(False, description="also train the score token (nearest value) with CE")
    impl: Literal["fused", "reference"] = Field("fused", description="fused: never forms tokens x vocab logits")
    kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="per-tile elementwise work of the fused loss: Triton on CUDA when auto")
    chunk_size: int | None = Field(None, gt=0, le=_BIG, description="active rows per logits tile (default: tile_mib)")
    vocab_shard: int | None = Field(None, gt=0, le=1 << 24, description="vocabulary rows per tile (default: all up to 131072)")
    tile_mib: int | None = Field(
        None, gt=0, le=1 << 20, description="logits-tile budget in MiB (default: 1024 on CUDA, 256 on CPU; see loss/tiling.py)")


class TrainingSection(_Section):
    output_dir: str = "runs"
    epochs: float = Field(1.0, gt=0, le=1e4)
    max_steps: int | None = Field(None, gt=0, le=1 << 40)
    micro_batch_size: int = Field(1, gt=0, le=1 << 16)
    gradient_accumulation_steps: int = Field(1, gt=0, le=1 << 16)
    learning_rate: float = Field(1e-5, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0, le=1e9)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy and Python RNGs take 32-bit seeds
    logging_steps: int = Field(1, gt=0, le=1 << 40)
    save_steps: int = Field(100, gt=0, le=1 << 40)
    num_to_keep: int = Field(2, ge=1, le=1000)  # checkpoints kept (Ray Train CheckpointConfig / torchrun)
    zero_stage: Literal[0, 1, 2, 3] = 3
    deepspeed_config: str | None = None  # a user-supplied DeepSpeed JSON replaces the generated one


InferenceBackend = Literal["auto", "hf", "vllm", "transformers"]  # transformers: the old name of hf


class VllmSection(_Section):
    """vLLM engine settings, shared by generation and evaluation (``tract_dist/runtime/vllm_engine.py``)."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # GPU memory vLLM may take (weights + KV cache)
    kv_cache_memory_gb: float | None = Field(None, gt=0, le=1 << 20)  # None: vLLM sizes it on GPU; 1 GiB on CPU
    enable_prefix_caching: bool = True  # the n CoTs of a prompt and their RAIL read-out share its KV blocks
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    max_model_len: int | None = Field(None, gt=0, le=1 << 24)  # None: the model's maximum (set it for 128K-context models)
    max_num_seqs: int | None = Field(None, gt=0, le=_BIG)  # requests decoded together; None: vLLM's default
    max_lora_rank: int | None = Field(None, gt=0, le=4096)  # None: the adapter's rank (rounded up to one vLLM accepts)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # engine seed; every project request carries its own


class GenerationSection(_Section):
    backend: InferenceBackend = "auto"  # auto: vLLM when importable and on GPU, else HF (the choice is logged)
    tensor_parallel_size: int = Field(1, gt=0, le=1024)  # vLLM: GPUs per replica (a model too big for one GPU)
    vllm: VllmSection = VllmSection()
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(0.9, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    max_new_tokens: int = Field(512, gt=0, le=_BIG)
    num_cots: int = Field(1, gt=0, le=1000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    batch_size: int = Field(8, gt=0, le=_BIG)
    stop: list[str] = ["So the overall", "[RESULT]"]
    output_dir: str | None = None
    ray: bool = True  # False: generate in-process (machines without Ray, e.g. one GPU)
    num_replicas: int | None = Field(None, gt=0, le=100_000)  # replicas in the actor pool; None: cluster.num_workers
    shard_size: int = Field(64, gt=0, le=_BIG)  # CoTs per committed output shard (the unit of resumption)
    # A CoT whose generation raised is retried on the next run until it has failed this many times; failures
    # that retrying cannot change (prompt too long, empty CoT with the same seed) are final at once.
    max_attempts: int = Field(3, ge=1, le=100)


class BenchmarkSpec(_Section):
    name: str = Field(pattern=SAFE_NAME)  # a folder name under the evaluation output
    path: str
    format: Literal["feedback-collection", "prometheus-eval", "jsonl"] = "prometheus-eval"
    split: str = "test"
    max_examples: int | None = Field(None, gt=0)
    offset: int = Field(0, ge=0, le=1 << 40)  # skip the first records (e.g. those a quickstart trains on)


class EvaluationSection(_Section):
    backend: InferenceBackend = "auto"  # the judge's engine (CoT-RAIL, decode, rail); vLLM options: generation.vllm
    tensor_parallel_size: int = Field(1, gt=0, le=1024)
    benchmarks: list[BenchmarkSpec] = []
    num_cots: int = Field(1, gt=0, le=1000)
    rail_normalize: bool = False
    batch_size: int = Field(8, gt=0, le=_BIG)
    mode: Literal["cot_rail", "decode", "rail"] = "cot_rail"  # decode / rail: the paper's baselines
    ray: bool = True  # False: score in-process; True: the generation actor pool (generation.num_replicas)
    output_dir: str | None = None


class PipelineSection(_Section):
    method: Literal["tract", "cot_raft", "ce_cot", "raft"] = "tract"
    output_dir: str = "runs/pipeline"
    evaluate_stage1: bool = True  # tract: evaluate the stage-1 model as well as the stage-2 one
    # A finished stage-1 export (an HF folder) used instead of training stage 1, e.g. the cot_raft run of the
    # same seed, which is TRACT's stage 1 (the quality benchmark); its content hash is the stage's fingerprint.
    stage1_export: str | None = None
    # Run only these stages (names or fnmatch patterns, e.g. "evaluate_*"); the others are used if up to
    # date. None: every stage. Lets a caller run one stage per process.
    stages: list[str] | None = None


class TrackingSection(_Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "tract-dist"
    run_name: str | None = Field(None, pattern=SAFE_NAME)  # also the training run's folder name


class ClusterSection(_Section):
    address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS)
    num_workers: int = Field(1, gt=0, le=100_000)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=4096)
    resources_per_worker: dict[str, float] = {}
    storage_path: str = "runs/ray"
    max_failures: int = Field(0, ge=0, le=10_000)
    launcher: Literal["ray", "torchrun", "inline"] = "ray"  # training; torchrun/inline need no Ray
    local_num_cpus: int | None = Field(None, gt=0, le=1 << 16)  # logical CPUs for a local Ray (see STACK-NOTES)
    object_store_memory_mb: int = Field(256, gt=0, le=1 << 24)
    # torch CPU threads per inference replica; None: the cores shared out among replicas. Fewer threads than
    # cores pay off on a shared machine (a descheduled OpenMP thread stalls every barrier).
    threads_per_replica: int | None = Field(None, gt=0, le=4096)


class Config(_Section):
    model: ModelSection
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    training: TrainingSection = TrainingSection()
    generation: GenerationSection = GenerationSection()
    evaluation: EvaluationSection = EvaluationSection()
    tracking: TrackingSection = TrackingSection()
    cluster: ClusterSection = ClusterSection()
    pipeline: PipelineSection = PipelineSection()

    @model_validator(mode="after")
    def _check_scale(self) -> "Config":
        lo, hi = (int(x) for x in self.data.scale.split("-"))
        if hi <= lo:
            raise ValueError(f"data.scale must be MIN-MAX with MIN < MAX, got {self.data.scale}")
        if hi - lo + 1 > MAX_SCALE_VALUES:
            raise ValueError(f"data.scale {self.data.scale} has {hi - lo + 1} values; at most {MAX_SCALE_VALUES} "
                             "(every value must be its own score token)")
        names = [b.name for b in self.evaluation.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.benchmarks: names must be unique (they name output folders), got {names}")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params and fingerprints."""
        return flatten(self.model_dump())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = _dotted(e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required value is missing"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (plain PyYAML keeps the last one, so a
    pasted duplicate would silently override the setting above it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while constructing a mapping (first '{key}' on line {seen[key] + 1})", node.start_mark,
                    f"duplicate key '{key}'", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` semantics (no arbitrary objects) plus duplicate-key rejection."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_text_file(path: Path, what: str = "file") -> str:
    """A text file as UTF-8 (a UTF-8 byte-order mark is accepted); any other encoding is named, not a traceback."""
    from tract_dist.fsutil import decode_utf8

    try:
        return decode_utf8(path.read_bytes())
    except UnicodeError as e:
        raise ConfigError(f"{path}: {what}: {e}") from None


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 3 -> int, true -> bool)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key segment")
    try:
        value = safe_load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from None
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Parse a YAML config (or ``base``) and apply overrides; every error names its source and key."""
    tree: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = safe_load_yaml(read_text_file(p, "config"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        tree.update(loaded)
    for ov in overrides:
        apply_override(tree, ov)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        src = source if not overrides else f"{source} (+ overrides)"
        raise ConfigError(_format_errors(src, e)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
