"""Typed, validated configuration: YAML (safe_load) + dotted ``section.key=value`` overrides.

Every error names the file (or "override") and the dotted key, so a typo in a 200-line config is found at
once instead of surfacing as a worker crash an hour into a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tract_dist.data.prompts import ABS_SYSTEM_PROMPT
from tract_dist.data.score_tokens import MAX_SCALE_VALUES
from tract_dist.errors import TractError
from tract_dist.protocol import STOP_STRINGS


class ConfigError(TractError, ValueError):
    """Invalid configuration; the message names the source and the dotted key."""


# Names that become folder names (runs, benchmarks, pipelines): one path component, no "..", no separators.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_BIG = 1 << 20  # upper bound for counts where anything larger is a typo (tokens, batch sizes, steps per save)


class _Section(BaseModel):
    # allow_inf_nan=False: a float key given as .inf or .nan (YAML) is rejected, never trained with
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSection(_Section):
    enabled: bool = Field(False, description="train LoRA adapters (PEFT) on the frozen model instead of every weight")
    r: int = Field(16, gt=0, le=4096, description="adapter rank, 1-4096 (the official runs: LLaMA-Factory's 8)")
    alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA scale numerator: the update is (alpha / r) * B @ A; "
                                                         "2 x r by default (the official runs: 16 with r 8)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input, in [0, 1)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every linear layer "
                                  "except the output head (PEFT), as in the official runs")
    merge_on_export: bool = Field(
        True, description="also write the merged model (W + alpha/r * B @ A) to export/model, the folder later stages "
                          "(generation, judge) load; false: export/adapter only, served unmerged")


class ModelSection(_Section):
    name_or_path: str = Field(
        description="the seed model (required): a Hugging Face hub name, a local HF folder (e.g. an export), or an "
                    "alias: smollm2 (offline SmolLM2-135M-Instruct), tiny-llama / random-llama-1b (random weights, "
                    "for tests and benchmarks)")
    tokenizer: str | None = Field(
        None, description="tokenizer name, path or alias (mistral, llama3, smollm2); None: the model's own")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of inference and training (training: DeepSpeed bf16 when it resolves to "
                            "bfloat16, else fp32; master weights stay fp32); auto: bfloat16 on GPU, float32 on CPU "
                            "(bf16 matmuls are slow on most CPUs)")
    attn_implementation: str | None = Field(
        None, description="transformers attn_implementation (sdpa, eager, flash_attention_2); None: "
                          "flash_attention_2 when flash-attn imports and the model runs on CUDA, else sdpa. Packed "
                          "training runs sdpa per example (tract_packed_sdpa)")
    trust_remote_code: bool = Field(
        False, description="let HF / vLLM run a model repository's own Python code; off by default (security): "
                           "set it only for a model you trust")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (non-reentrant): far less activation "
                           "memory for about one extra forward pass per step")
    lora: LoraSection = Field(LoraSection(), description="LoRA adapters instead of full fine-tuning")


PAIRWISE_TRAIN_FORMATS = ("preference-collection", "prometheus-eval-pairwise", "pairs-jsonl")
PAIRWISE_BENCHMARK_FORMATS = PAIRWISE_TRAIN_FORMATS + ("vicuna-pairs",)
"""Layouts of relative-grading data (data/pair_formats.py); a benchmark in one of them is a relative benchmark."""


class DataSection(_Section):
    train_path: str | None = Field(
        None, description="training data (also generation's prompts): a local JSON / JSONL / Parquet file or "
                          "hf:NAME (a hub dataset); required by train, generate and pipeline")
    task: Literal["absolute", "relative"] = Field(
        "absolute", description="what the judge is trained to do: absolute grading (one response, a score on "
                                "data.scale, ŷ = Σ v·p(v)) or relative grading (two responses, '[RESULT] A' or 'B'; "
                                "p(A) renormalised over the verdict tokens, regressed on the preference y: "
                                "data/relative.py); relative needs a pairwise train_format")
    train_format: Literal["feedback-collection", "prometheus-eval", "jsonl", "preference-collection",
                          "prometheus-eval-pairwise", "pairs-jsonl"] = Field(
        "feedback-collection", description="record layout of train_path: Feedback Collection (the paper's training "
                                           "set), prometheus-eval benchmark JSON, or the project's JSONL (absolute "
                                           "task); the Preference Collection, prometheus-eval's pairwise files or "
                                           "the project's pairs JSONL (relative task: data/pair_formats.py)")
    split: str = Field("train", description="dataset split read from an hf:NAME train_path (ignored for files)")
    max_length: int = Field(
        3000, ge=64, le=1 << 24, description="tokens per sequence, 64-16M: a training sequence (prompt + CoT + score "
                                             "+ EOS) and a judge's prompt plus generation; 3000 is the official runs' "
                                             "cutoff")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="an over-long example: truncate shortens its response, reference answer, then "
                                "instruction to fit (counted); drop skips it (counted)")
    skip_invalid: bool = Field(
        False, description="skip and count malformed records (training data, generation prompts, benchmarks) "
                           "instead of stopping at the first one with an error naming file, record and field")
    max_examples: int | None = Field(None, gt=0, description="use only the first N records of train_path; None: all")
    scale: str = Field("1-5", pattern=r"^\d{1,6}-\d{1,6}$",
                       description=f"score range MIN-MAX (MIN < MAX, at most {MAX_SCALE_VALUES} values); ŷ = Σ v·p(v) over its "
                                   "values; a value of several tokens (1-10 for Mistral: '10') is read over the "
                                   "values' token trie (data/score_scale.py; not with training.packing or REAL)")
    system_prompt: str | None = Field(
        ABS_SYSTEM_PROMPT, description="system message of every prompt (training, generation, judging); default: "
                                       "Prometheus's absolute-grading system prompt; null or empty: none (the "
                                       "official training data has none)")
    use_cot: bool = Field(
        True, description="train on CoT + score targets; false: score-only targets (the RAFT baseline without CoT; "
                          "records then need no feedback)")
    enable_thinking: bool = Field(
        False, description="the chat template's thinking switch (Qwen3 and other hybrid-reasoning templates), passed "
                           "wherever a prompt is templated (training, generation, judging, serving): false closes an "
                           "empty <think></think> block in the generation prompt, so the judge writes its feedback "
                           "(the CoT) at once; true lets the model reason first. Templates without the switch "
                           "ignore it")


class LossSection(_Section):
    """The CoT-RAFT loss; built once into :class:`tract_dist.loss.CoTRaftLossOptions`."""

    lam: float = Field(
        1.0, ge=0, le=1e6, description="weight of the MSE term, 0-1e6: loss = ce + lam * mse, mse the global "
                                       "per-sequence mean of (ŷ - y)²; 1.0 is the paper's formula, the official runs' "
                                       "code amounts to 1 / per-device batch (FIDELITY.md)")
    lam_warmup_steps: int = Field(
        0, ge=0, le=1 << 40, description="ramp λ linearly from 0 at the first optimizer step to lam at this step "
                                         "(lam * step / N, 0-based); 0: lam throughout. The λ in force is logged "
                                         "every step (metric lam)")
    rail_normalize: bool = Field(
        False, description="train ŷ over the score tokens' renormalised distribution (Σ v_k p_k / Σ p_k) instead "
                           "of the full-vocabulary softmax (off: as the paper); recorded in the export, which "
                           "evaluation.rail_normalize follows unless set")
    ce_on_score_token: bool = Field(
        False, description="also give the score position a CE target, the score token nearest the gold score "
                           "(TRACT masks it out of CE; the ce_cot method turns it on)")
    impl: Literal["fused", "reference"] = Field(
        "fused", description="fused: chunked over rows and vocabulary, never forms the tokens x vocab logits; "
                             "reference: full logits (tests, comparison)")
    kernel: Literal["auto", "torch", "triton"] = Field(
        "auto", description="per-tile elementwise work of the fused loss: triton (CUDA only), torch, or auto: "
                            "Triton on CUDA (the TRACT_LOSS_TRITON environment variable overrides auto)")
    chunk_size: int | None = Field(
        None, gt=0, le=_BIG, description="active rows (tokens) per logits tile; None: as many as tile_mib holds")
    vocab_shard: int | None = Field(
        None, gt=0, le=1 << 24, description="vocabulary rows per logits tile; None: the whole vocabulary up to "
                                            "131072 rows, else 65536")
    tile_mib: int | None = Field(
        None, gt=0, le=1 << 20, description="logits-tile budget in MiB; None: 1024 on CUDA, 256 on CPU "
                                            "(loss/tiling.py)")


class TrainingSection(_Section):
    output_dir: str = Field(
        "runs", description="folder of training runs: each run is OUTPUT_DIR/RUN_NAME (checkpoints, metrics.jsonl, "
                            "export/); also the default parent of generation and evaluation output")
    epochs: float = Field(
        1.0, gt=0, le=1e4, description="passes over the training set, fractional allowed: ceil(epochs x steps per "
                                       "epoch) optimizer steps (the official runs: Mistral 2, Llama 1)")
    max_steps: int | None = Field(
        None, gt=0, le=1 << 40, description="optimizer steps to run, overriding epochs; None: from epochs")
    micro_batch_size: int = Field(
        1, gt=0, le=1 << 16, description="sequences per worker per forward/backward; the global batch is "
                                         "micro_batch_size x gradient_accumulation_steps x cluster.num_workers")
    gradient_accumulation_steps: int = Field(
        1, gt=0, le=1 << 16, description="micro-batches accumulated per optimizer step")
    global_batch_size: int | None = Field(
        None, gt=0, le=1 << 24, description="samples per optimizer step, all workers together, whatever the number "
                                            "of workers (each worker's share is split into micro-batches of at most "
                                            "micro_batch_size; gradient_accumulation_steps is then unused); None: "
                                            "micro_batch_size x gradient_accumulation_steps x cluster.num_workers at "
                                            "the run's start. A run resumed on another number of workers keeps its "
                                            "global batch either way; required with cluster.min_workers")
    packing: bool = Field(
        False, description="pack whole examples into rows of at most max_tokens_per_micro_batch tokens, no padding, "
                           "attention kept inside each example (flash-attention varlen on GPU, a block-diagonal mask "
                           "with sdpa/eager); the same samples per step and the same loss as padded batches")
    max_tokens_per_micro_batch: int | None = Field(
        None, gt=0, le=1 << 24, description="packing: tokens per packed row (one row per forward), at least "
                                            "data.max_length; None: micro_batch_size x data.max_length (never more "
                                            "tokens than a full padded micro-batch)")
    group_by_length: bool = Field(
        False, description="padded batches: sort each step's samples by length before splitting them into "
                           "micro-batches (less padding; the step's samples, and so its gradient, unchanged)")
    learning_rate: float = Field(
        1e-5, gt=0, le=10, description="peak AdamW learning rate (the official runs: 1e-5)")
    weight_decay: float = Field(0.0, ge=0, le=1e3, description="AdamW (decoupled) weight decay")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="fraction of the optimizer steps spent in linear warm-up, 0-1 (the official "
                                     "runs: 0.1)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after warm-up: cosine or linear to 0, or constant (the official "
                              "runs: cosine)")
    max_grad_norm: float = Field(
        1.0, ge=0, le=1e9, description="gradient clipping to this global L2 norm (DeepSpeed gradient_clipping); "
                                       "0: no clipping")
    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="seed of initialisation (random-weight aliases, LoRA adapters), the "
                                            "data order and dropout; 0 to 2^32-1 (numpy and Python RNGs take 32-bit "
                                            "seeds)")
    logging_steps: int = Field(
        1, gt=0, le=1 << 40, description="log metrics to MLflow and the console every N optimizer steps "
                                         "(metrics.jsonl gets every step)")
    save_steps: int = Field(
        100, gt=0, le=1 << 40, description="write a checkpoint every N optimizer steps, and always at the last one")
    num_to_keep: int = Field(
        2, ge=1, le=1000, description="checkpoints kept (Ray Train CheckpointConfig / torchrun); older ones are "
                                      "pruned once a newer one is complete")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="DeepSpeed ZeRO stage: 3 partitions parameters, gradients and optimizer state across "
                       "workers (the official runs used ZeRO-3)")
    deepspeed_config: str | None = Field(
        None, description="a DeepSpeed JSON file that replaces the generated one; its \"auto\" values are filled "
                          "from training.* (as Hugging Face's integration does)")


InferenceBackend = Literal["auto", "hf", "vllm", "transformers"]  # transformers: the old name of hf


class VllmSection(_Section):
    """vLLM engine settings, shared by generation and evaluation (``tract_dist/runtime/vllm_engine.py``)."""

    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction (0, 1] of each GPU's memory vLLM may take (weights + KV cache)")
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, le=1 << 20, description="KV-cache size in GiB; None: vLLM sizes it from gpu_memory_utilization "
                                            "on GPU, 1 GiB on CPU (where vLLM would otherwise reserve that fraction "
                                            "of host memory)")
    enable_prefix_caching: bool = Field(
        True, description="reuse KV blocks of shared prefixes: the n CoTs of a prompt and their RAIL read-out "
                          "share the prompt's blocks")
    enforce_eager: bool | None = Field(None, description="disable CUDA graphs; None: eager on CPU, CUDA graphs on GPU")
    max_model_len: int | None = Field(
        None, gt=0, le=1 << 24, description="context length vLLM allocates for, in tokens; None: the model's "
                                            "maximum (set it for 128K-context models, whose KV cache would not fit)")
    max_num_seqs: int | None = Field(
        None, gt=0, le=_BIG, description="requests decoded together (vLLM max_num_seqs); None: vLLM's default")
    max_lora_rank: int | None = Field(
        None, gt=0, le=4096, description="largest LoRA rank the engine accepts for an unmerged adapter; None: the "
                                         "adapter's rank, rounded up to one vLLM accepts")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="the engine's own seed; every project request carries its own seed "
                                           "(generation.seed), so CoTs do not depend on it")


class GenerationSection(_Section):
    backend: InferenceBackend = Field(
        "auto", description="engine of stage-2 CoT generation: hf, vllm, or auto: vLLM where it imports and runs on "
                            "a GPU, else HF (the choice and its reason are logged); transformers: the old name of hf")
    tensor_parallel_size: int = Field(
        1, gt=0, le=1024, description="GPUs per generation replica (vLLM only), for a model too big for one GPU")
    vllm: VllmSection = Field(VllmSection(), description="vLLM engine settings, shared by generation and evaluation")
    temperature: float = Field(
        1.0, ge=0, le=100, description="sampling temperature of CoTs, 0 = greedy (the official inference: 1.0); "
                                       "also evaluation's CoTs when evaluation.num_cots > 1")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus-sampling mass, (0, 1] (the official inference: 0.9)")
    repetition_penalty: float = Field(
        1.0, gt=0, le=100, description="repetition penalty of generation and judging; 1.0: none (the official "
                                       "inference: 1.03)")
    max_new_tokens: int = Field(
        512, gt=0, le=_BIG, description="most tokens generated per CoT (the official inference: up to 1024); a judge "
                                        "keeps them free in its context (generation.max_length)")
    max_length: int | None = Field(
        None, ge=64, le=1 << 24, description="tokens of an inference sequence (prompt + CoT + score read-out) for "
                                             "stage-2 generation and judging; the prompt is shortened to leave "
                                             "max_new_tokens free. None: data.max_length (the training cutoff); the "
                                             "official inference ran vLLM with a 4900-token context")
    num_cots: int = Field(
        1, gt=0, le=1000, description="CoTs generated per training example for stage 2 (the official stage-2 data: "
                                      "one); each is read out by RAIL as it is written, for generation.select")
    select: Literal["all", "nearest", "within", "weighted"] = Field(
        "all", description="which generated CoTs stage 2 trains on, judged by |ŷ - y*| (each CoT's own RAIL "
                           "read-out against the gold score): all (the paper), nearest (per prompt the CoT with "
                           "the smallest error), within (every CoT with error <= select_tolerance), weighted "
                           "(every CoT, weight n_p * softmax(-error² / 2 tolerance²) per prompt; "
                           "generate/select.py)")
    select_tolerance: float = Field(
        0.5, ge=0, le=1e6, description="an acceptable CoT's largest |ŷ - y*| (within, the fallback rule), and the "
                                       "width of the weighted rule's weights (> 0 there)")
    select_fallback: Literal["nearest", "drop"] = Field(
        "nearest", description="a prompt none of whose CoTs is within select_tolerance (nearest, within, "
                               "weighted): nearest keeps its nearest CoT (weighted: its CoTs, weight concentrated "
                               "on the nearest), drop leaves the prompt out of stage 2; both are counted")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="base of the per-(example, CoT) sampling seeds of generation and judging: "
                                           "a CoT depends only on its prompt, index and this seed, so reruns and "
                                           "resumptions reproduce it")
    batch_size: int = Field(
        8, gt=0, le=_BIG, description="prompts per replica batch: HF's generate batch; on vLLM the unit of commit "
                                      "and retry")
    stop: list[str] = Field(
        list(STOP_STRINGS), description="strings that end a generated CoT: the official CoT cut and stop "
                                        "(protocol.py, FIDELITY.md); also the judge's")
    output_dir: str | None = Field(
        None, description="folder of the CoT shards; None: TRAINING.OUTPUT_DIR/generate (a pipeline uses its own)")
    ray: bool = Field(
        True, description="generate through a Ray Data actor pool; false: in-process (machines without Ray, e.g. "
                          "one GPU)")
    num_replicas: int | None = Field(
        None, gt=0, le=100_000, description="model replicas in the actor pool, for generation and evaluation; None: "
                                            "cluster.num_workers")
    shard_size: int = Field(
        64, gt=0, le=_BIG, description="CoTs per committed output shard, the unit of resumption: a killed run "
                                       "redoes only CoTs not yet in a shard")
    max_attempts: int = Field(
        3, ge=1, le=100, description="a CoT whose generation raised is retried on later passes and runs until it "
                                     "has failed this many times; failures retrying cannot change (prompt too "
                                     "long, empty CoT with the same seed) are final at once")


class BenchmarkSpec(_Section):
    name: str = Field(
        pattern=SAFE_NAME, description="the benchmark's name (required, unique): its folder under the evaluation "
                                       "output and the prefix of its MLflow metrics; letters, digits, . _ -")
    path: str = Field(description="the benchmark data (required): a local JSON / JSONL / Parquet file or hf:NAME")
    format: Literal["feedback-collection", "prometheus-eval", "jsonl", "preference-collection",
                    "prometheus-eval-pairwise", "pairs-jsonl", "vicuna-pairs"] = Field(
        "prometheus-eval", description="record layout of path (prometheus-eval: its label is the mean of "
                                       "gpt4_score). The pairwise layouts (preference-collection, "
                                       "prometheus-eval-pairwise, pairs-jsonl; vicuna-pairs: a prometheus-eval "
                                       "absolute file paired by gold-score difference >= 1) make it a "
                                       "relative benchmark: accuracy and the position-swap agreement")
    split: str = Field("test", description="dataset split read from an hf:NAME path (ignored for files)")
    max_examples: int | None = Field(None, gt=0, description="judge only the first N records after offset; None: all")
    offset: int = Field(
        0, ge=0, le=1 << 40, description="skip the first records (e.g. those a quickstart trains on)")


class EvaluationSection(_Section):
    backend: InferenceBackend = Field(
        "auto", description="the judge's engine (CoT-RAIL, decode, rail): hf, vllm or auto, as generation.backend; "
                            "vLLM options: generation.vllm")
    tensor_parallel_size: int = Field(
        1, gt=0, le=1024, description="GPUs per judge replica (vLLM only), for a model too big for one GPU")
    benchmarks: list[BenchmarkSpec] = Field(
        [], description="the benchmarks to evaluate on, each {name, path, format, split, max_examples, offset}")
    num_cots: Annotated[int, Field(gt=0, le=1000)] | Literal["auto"] = Field(
        1, description="CoTs per input, their ŷ averaged: 1 is greedy (unless sample_single_cot), more are sampled "
                       "with generation's temperature / top_p (the paper reports 1 and 5); auto: sample until the "
                       "standard error of the mean ŷ is <= cot_se_target or max_cots are drawn (at least 3; "
                       "judge/adaptive.py)")
    cot_se_target: float = Field(
        0.1, gt=0, le=1e6, description="num_cots=auto: stop sampling an input's CoTs once the standard error of its "
                                       "mean ŷ (sample sd / sqrt(n)) is at most this")
    max_cots: int = Field(
        8, ge=3, le=1000, description="num_cots=auto: the most CoTs drawn per input")
    sample_single_cot: bool = Field(
        False, description="with num_cots 1, sample the CoT with generation's temperature / top_p / seed as the "
                           "official inference did (vLLM, temperature 1.0) instead of decoding it greedily")
    rail_normalize: bool | None = Field(
        None, description="read ŷ over the score tokens' renormalised distribution (Σ v_k p_k / Σ p_k) instead of "
                          "the full-vocabulary softmax; None: what the export records training used "
                          "(loss.rail_normalize), else false; a value that differs from the record is used, "
                          "with a warning")
    batch_size: int = Field(
        8, gt=0, le=_BIG, description="inputs per judge batch (the pool's batch and HF's forward batch)")
    mode: Literal["cot_rail", "decode", "rail"] = Field(
        "cot_rail", description="cot_rail: CoT then ŷ from the score distribution (the paper's method); decode: "
                                "parse the generated score; rail: ŷ with no CoT (the paper's baselines)")
    ray: bool = Field(
        True, description="judge through the Ray actor pool (generation.num_replicas replicas); false: in-process")
    output_dir: str | None = Field(
        None, description="folder of predictions, metrics and plots per benchmark; None: "
                          "TRAINING.OUTPUT_DIR/evaluate")


class ServeSection(_Section):
    max_new_tokens: int | None = Field(
        None, gt=0, le=_BIG, description="`tract-dist serve`: most new tokens per CoT a served judge generates "
                                         "(cot_rail, decode); None: generation.max_new_tokens. Printed at start-up "
                                         "with the replica's measured decode speed; a request that cannot finish "
                                         "within --request-timeout-s at that speed is refused (422) naming this "
                                         "key. On a CPU a few hundred tokens take minutes: use mode rail or a "
                                         "small budget there")


class RealSection(_Section):
    """REAL after TRACT (`tract-dist train-real`, the pipeline's `train_real` stage): tract_dist/real/."""

    steps: int = Field(20, gt=0, le=_BIG, description="rounds: each samples `k` CoTs for `prompts_per_step` "
                                                      "prompts and makes `updates_per_round` optimizer steps")
    prompts_per_step: int = Field(4, gt=0, le=1 << 20, description="training prompts per round (drawn in a seeded "
                                                                   "order from data.train_path, epoch by epoch)")
    k: int = Field(4, ge=2, le=1024, description="CoTs sampled per prompt (>= 2: the leave-one-out baseline needs "
                                                 "another sample; REAL's scripts: 8)")
    temperature: float = Field(1.0, gt=0, le=100, description="rollout sampling temperature (REAL: 1.0)")
    top_p: float = Field(1.0, gt=0, le=1, description="rollout nucleus mass (REAL: 0.9; 1.0 keeps the policy "
                                                      "gradient unbiased: samples from π itself)")
    max_new_tokens: int = Field(256, gt=0, le=1 << 20, description="most tokens per sampled CoT (REAL: 1,024)")
    lam: float = Field(1.0, ge=0, le=1e6, description="λ of the prediction-refinement term λ·mean (ŷ - y)² on "
                                                      "the sampled CoTs; 0: policy gradient only")
    beta: float = Field(0.0, ge=0, le=1e6, description="β of the k3 KL penalty to the reference policy on the CoT "
                                                       "tokens (the adapter disabled: needs model.lora.enabled; "
                                                       "REAL's 32B script: 0, its README: 0.01)")
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="AdamW rate of the REAL stage (REAL: 1e-6 full, "
                                                                 "x10 with LoRA)")
    updates_per_round: int = Field(1, gt=0, le=1024, description="optimizer steps per round's samples: 1 is "
                                                                 "on-policy; more use PPO-clipped importance "
                                                                 "ratios against the sampling log-probs")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range ε of the importance ratio (REAL: 0.2)")
    advantage_norm: Literal["none", "std"] = Field(
        "none", description="none: A_i = r_i - mean_{j!=i} r_j (unbiased); std: divided by the prompt's std, as "
                            "REAL's official actor with normalize_advantages")
    advantage_clip: float | None = Field(None, gt=0, le=1e6, description="clamp advantages to [-c, c] (REAL: 1.0 "
                                                                         "with std); None: no clamp")
    seed: int = Field(0, ge=0, le=2**62, description="base of the prompt order and of every CoT's sampling seed "
                                                     "(a function of round, prompt id and sample index: a resumed "
                                                     "run draws the same CoTs)")
    rollout_workers: int = Field(1, gt=0, le=4096, description="rollout engines (Ray actors; in-process with "
                                                               "the torchrun / inline launchers)")
    rollout_cpus: float = Field(1.0, gt=0, le=4096, description="CPUs Ray reserves per rollout actor (logical)")
    rollout_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per rollout actor (0 on CPU; a fraction "
                                                              "shares a GPU with the training workers)")
    rollout_threads: int | None = Field(None, gt=0, le=4096, description="torch CPU threads per rollout "
                                                                         "engine; None: torch's default")
    rollout_backend: InferenceBackend = Field(
        "auto", description="the rollout engines: hf (PEFT model, adapter loaded with set_peft_model_state_dict), "
                            "vllm (the adapter written as a PEFT folder and served as a new LoRARequest each "
                            "round), auto (vllm on a GPU when it imports, else hf)")
    rollout_batch_size: int = Field(8, gt=0, le=1 << 16, description="rows per HF generate call in a rollout")
    rollout_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the rollout engines' dtype; auto: bf16 on GPU, fp32 on CPU (where the sampling "
                            "log-probs then equal the fp32 trainer's)")


class PipelineSection(_Section):
    method: Literal["tract", "cot_raft", "ce_cot", "raft", "real"] = Field(
        "tract", description="tract: both stages; cot_raft: stage 1 only; ce_cot: CE only (lam 0, CE on the score "
                             "token; evaluated by decode and cot_rail); raft: score-only targets, rail inference; "
                             "real: TRACT, then REAL (train_real) from the stage-2 export")
    output_dir: str = Field(
        "runs/pipeline", description="folder of pipelines: each is OUTPUT_DIR/NAME (state, runs, CoTs, evaluations)")
    evaluate_stage1: bool = Field(
        True, description="tract: evaluate the stage-1 model as well as the stage-2 one")
    stage1_export: str | None = Field(
        None, description="a finished stage-1 export (an HF folder) used instead of training stage 1, e.g. the "
                          "cot_raft run of the same seed, which is TRACT's stage 1 (the quality benchmark); its "
                          "content hash is the stage's fingerprint")
    real_init: str | None = Field(
        None, description="real: start train_real from this export (an HF folder, e.g. a cot_raft one) instead "
                          "of training TRACT's stages; its content hash is the stage's fingerprint")
    stages: list[str] | None = Field(
        None, description="run only these stages (names or fnmatch patterns, e.g. \"evaluate_*\"); the others are "
                          "used if up to date. None: every stage. Lets a caller run one stage per process")


class TrackingSection(_Section):
    enabled: bool = Field(True, description="log params, metrics and artifacts to MLflow; false: no tracking")
    tracking_uri: str = Field(
        "sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///FILE, http(s)://SERVER); the default is a "
                                           "SQLite file in the working directory (MLflow 3 refuses a plain folder "
                                           "store); credentials in it are redacted from logs")
    experiment: str = Field("tract-dist", description="MLflow experiment of every run")
    run_name: str | None = Field(
        None, pattern=SAFE_NAME, description="MLflow run name, also the training run's folder name; None: the "
                                             "stage and the config's fingerprint (training), the stage (others)")
    log_models: bool = Field(
        True, description="log each training export as an MLflow model of its run (transformers flavour; a "
                          "pointer to the folder when over 4 GiB), so the runs table leads to the weights")
    registered_model_name: str | None = Field(
        None, pattern=SAFE_NAME, description="register each logged export as a new version of this MLflow "
                                             "model; None: logged, not registered")


class ClusterSection(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join (ray://HOST:PORT or auto); None: RAY_ADDRESS, else a local Ray")
    num_workers: int = Field(
        1, gt=0, le=100_000, description="training workers (ranks: Ray Train workers or torchrun processes), and "
                                         "the inference pool's replicas unless generation.num_replicas is set")
    use_gpu: bool = Field(
        False, description="run on GPUs: one per training worker (DeepSpeed on CUDA), tensor_parallel_size per "
                           "inference replica; false: CPU")
    cpus_per_worker: float = Field(
        1.0, gt=0, le=4096, description="CPUs Ray reserves per worker / replica (fractional allowed); on CPU also "
                                        "each training worker's OpenMP threads")
    resources_per_worker: dict[str, float] = Field(
        {}, description="extra Ray resources per training worker (name: amount), e.g. {my_resource: 1}")
    storage_path: str = Field(
        "runs/ray", description="the storage stages hand data through: Ray Train's checkpoints and, on a URI "
                                "(s3://, gs://; credentials from each node's environment), the training exports "
                                "(with a content manifest, fetched by each node into its local cache), a "
                                "pipeline's CoT shards, stage-2 data and evaluation outputs (mirrored under "
                                "<storage_path>/<pipeline>/) and a new MLflow experiment's artifacts "
                                "(<storage_path>/mlflow/<experiment>). A local folder (the default: one machine) "
                                "must be one every node mounts when the cluster has several nodes (checked at "
                                "launch); a pipeline uses <pipeline>/ray unless set")
    max_failures: int = Field(
        0, ge=0, le=10_000, description="times Ray Train restarts a failed worker group from the last checkpoint "
                                        "before the run fails; 0: none")
    min_workers: int | None = Field(
        None, gt=0, le=100_000, description="elastic training (Ray launcher): Ray Train starts between min_workers "
                                            "and num_workers workers, as many as the cluster can place, and restarts "
                                            "the group at another size from the last checkpoint when workers are lost "
                                            "or resources appear; needs training.global_batch_size. None: exactly "
                                            "num_workers")
    elastic_resize_interval_s: float = Field(
        60.0, ge=0, le=1e6, description="elastic training: how often Ray Train checks, while healthy, whether more "
                                        "workers could run (a resize restarts from the last checkpoint)")
    launcher: Literal["ray", "torchrun", "inline"] = Field(
        "ray", description="how training starts its workers: Ray Train, torchrun (no Ray), or inline (in this "
                           "process, no Ray)")
    local_num_cpus: int | None = Field(
        None, gt=0, le=1 << 16, description="logical CPUs of a local Ray (raised to what the workers need + 1, at "
                                            "least 4, so actors never starve Ray Data's tasks: STACK-NOTES); None: "
                                            "twice the cores for a training run or pipeline")
    object_store_memory_mb: int = Field(
        256, gt=0, le=1 << 24, description="a local Ray's object store in MiB (it lives in /dev/shm)")
    threads_per_replica: int | None = Field(
        None, gt=0, le=4096, description="torch CPU threads per inference replica; None: the cores shared out among "
                                         "replicas. Fewer threads than cores pay off on a shared machine (a "
                                         "descheduled OpenMP thread stalls every barrier)")


class PlanSection(_Section):
    """What ``tract-dist plan`` (and the check ``train``, ``pipeline`` and ``submit`` run first) assumes."""

    gpu: Literal["h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l40s-48gb"] | None = Field(
        None, description="the accelerator a GPU run is sized for (memory, bf16 peak, bandwidth: "
                          "tract_dist/plan/hardware.py); None: this machine's CUDA device, else h100-80gb")
    gpu_memory_gib: float | None = Field(
        None, gt=0, le=1 << 16, description="the accelerator's memory in GiB, overriding the table (another card)")
    margin: float = Field(
        0.1, ge=0, lt=1, description="share of device memory left for what the plan does not count (CUDA context, "
                                     "NCCL, allocator fragmentation): above (1 - margin) x memory is tight (a "
                                     "warning), above the memory it does not fit (refused)")
    mfu: float = Field(
        0.35, gt=0, le=1, description="model-FLOPs utilisation assumed for training and prefill time (FLOPs / "
                                      "(GPUs x bf16 peak x mfu)); measure yours and set it")
    hbm_efficiency: float = Field(
        0.6, gt=0, le=1, description="share of peak memory bandwidth a decode step reaches (decoding reads every "
                                     "weight and each sequence's KV cache once per token)")
    mean_tokens: int | None = Field(
        None, gt=0, le=1 << 24, description="tokens per training sequence as computed (padded micro-batches: their "
                                            "padded length); None: data.max_length, the bound")
    loss_rows_fraction: float = Field(
        0.3, gt=0, le=1, description="share of a sequence's tokens the loss reads (CoT, EOS and the score; the "
                                     "prompt is masked): sizes the loss head's rows and FLOPs and the CoT share of "
                                     "generation (Feedback Collection: about 0.2-0.25)")
    examples: int | None = Field(
        None, gt=0, le=1 << 40, description="training examples, for the number of steps and CoTs when the data "
                                            "cannot be counted here (hf:NAME); None: data.max_examples or the local "
                                            "file's records")
    check: Literal["refuse", "warn"] = Field(
        "refuse", description="a run that will not fit: refuse before anything starts (exit 2), or only warn; "
                              "--no-plan-check skips the check")


class Config(_Section):
    model: ModelSection = Field(description="the seed model and how to load and adapt it")
    data: DataSection = Field(DataSection(), description="training data, prompt layout and score scale")
    loss: LossSection = Field(LossSection(), description="the CoT-RAFT loss")
    training: TrainingSection = Field(TrainingSection(), description="optimizer, schedule, checkpoints, DeepSpeed")
    generation: GenerationSection = Field(GenerationSection(), description="stage-2 CoT generation and sampling")
    evaluation: EvaluationSection = Field(EvaluationSection(), description="the judge and its benchmarks")
    tracking: TrackingSection = Field(TrackingSection(), description="MLflow tracking")
    cluster: ClusterSection = Field(ClusterSection(), description="Ray cluster, workers and launcher")
    pipeline: PipelineSection = Field(PipelineSection(), description="the end-to-end pipeline and its method")
    serve: ServeSection = Field(ServeSection(), description="the judge server (tract-dist serve)")
    plan: PlanSection = Field(PlanSection(), description="what the plan (memory, FLOPs, time) assumes")
    real: RealSection = Field(RealSection(), description="REAL: regression-aware RL after TRACT (train-real)")

    @model_validator(mode="after")
    def _check_scale(self) -> "Config":
        lo, hi = (int(x) for x in self.data.scale.split("-"))
        if hi <= lo:
            raise ValueError(f"data.scale must be MIN-MAX with MIN < MAX, got {self.data.scale}")
        if hi - lo + 1 > MAX_SCALE_VALUES:
            raise ValueError(f"data.scale {self.data.scale} has {hi - lo + 1} values; at most {MAX_SCALE_VALUES} "
                             "(every value must be its own score token)")
        t, c = self.training, self.cluster
        budget = t.max_tokens_per_micro_batch
        if t.packing and budget is not None and budget < self.data.max_length:
            raise ValueError(f"training.max_tokens_per_micro_batch ({t.max_tokens_per_micro_batch}) must be at least "
                             f"data.max_length ({self.data.max_length}): a packed row holds whole examples")
        if c.min_workers is not None:
            if c.min_workers > c.num_workers:
                raise ValueError(f"cluster.min_workers ({c.min_workers}) must not exceed cluster.num_workers "
                                 f"({c.num_workers}), the most workers an elastic run starts")
            if t.global_batch_size is None:
                raise ValueError("cluster.min_workers (elastic training) needs training.global_batch_size: the "
                                 "samples per step must not depend on how many workers Ray could start")
            if t.global_batch_size < c.num_workers:
                raise ValueError(f"training.global_batch_size ({t.global_batch_size}) is smaller than "
                                 f"cluster.num_workers ({c.num_workers}): some worker would have no sample")
        pairwise = self.data.train_format in PAIRWISE_TRAIN_FORMATS
        if self.data.task == "relative" and not pairwise:
            raise ValueError(f"data.task relative trains on pairs: data.train_format must be one of "
                             f"{', '.join(PAIRWISE_TRAIN_FORMATS)}, got {self.data.train_format}")
        if self.data.task == "absolute" and pairwise:
            raise ValueError(f"data.train_format {self.data.train_format} holds pairs: set data.task: relative")
        names = [b.name for b in self.evaluation.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.benchmarks: names must be unique (they name output folders), got {names}")
        return self

    def derive(self, **sections: dict[str, Any]) -> "Config":
        """A stage's config: this one with some keys of some sections replaced, e.g. ``cfg.derive(loss={"lam":
        0.0})``. Each named section is ``model_copy(update=...)``'d and the others are shared, so nothing is
        dumped to dicts and validated again; the values come from a validated config or from the code deriving
        the stage."""
        unknown = set(sections) - set(type(self).model_fields)
        if unknown:
            raise KeyError(f"Config.derive: no section {sorted(unknown)}")
        return self.model_copy(update={name: getattr(self, name).model_copy(update=update)
                                       for name, update in sections.items()})

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
    """``yaml.safe_load`` semantics (no arbitrary objects) plus duplicate-key rejection. PyYAML composes nested
    collections recursively: a document nested ~1000 levels deep raises RecursionError, reported as a YAML error
    (the callers name the file or override) rather than a traceback."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to parse (lists/mappings inside each other, hundreds of levels "
                             "deep)") from None


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
