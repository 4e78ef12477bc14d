"""Per-device memory of a training step and of an inference replica, as named components in bytes.

Training (one ZeRO-3 worker): model states from DeepSpeed's own estimator; the activations a decoder layer saves
for backward, counted tensor by tensor from what transformers' Llama / Mistral / Qwen3 / Qwen3-MoE layers and
PEFT's LoRA layers hand to autograd (checked per layer to the byte on CPU in fp32 and bf16 with the memory probe:
``benchmarks/plan/bench_plan_memory.py``); the fused loss head's tile from :mod:`tract_dist.loss.tiling`; the
buffers DeepSpeed allocates. Inference (one replica): weights per tensor-parallel rank, the KV cache
(2 x layers x kv_heads x head_dim x bytes per token) and the engine's workspace.

Every component says how it was computed (``how``), so a plan can be checked by hand. The training peak is what
lives through the step (model states, DeepSpeed's buffers) plus the larger of the forward-backward (the
activations, and the larger of the loss head's and one layer backward's transients, which never coexist) and the
optimizer step's temporaries (``Component.phase``, ``MemoryEstimate.total``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tract_dist.plan.shape import LoraShape, ModelShape

FP32 = 4
GIB = 1 << 30
#: DeepSpeed 0.19's ZeRO-3 defaults for the buffers it sizes from config (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
#: Non-PyTorch memory a vLLM replica takes besides weights, KV cache and activations: CUDA graphs, NCCL, the CUDA
#: context (vLLM's own start-up logs put CUDA graphs at 0.5-1 GiB for 7-70B models).
VLLM_OVERHEAD_BYTES = 3 * GIB // 2


#: Phases of a training step. Activations live from the forward to the end of the backward; within that, the
#: fused loss head's transients (its tile, work blocks, rows and the lm_head gradient it computes in its forward,
#: all handed over or freed before the decoder's backward starts) and one decoder layer's backward (its
#: recomputation and input gradients) never coexist; the optimizer step comes after the activations are freed.
ACTIVATIONS, LOSS_PHASE, LAYER_PHASE, OPTIMIZER_PHASE = "activations", "loss head", "layer backward", "optimizer step"
#: DeepSpeed's default zero_optimization.sub_group_size: ZeRO-3 steps the optimizer over its fp32 partition in
#: groups of at most this many elements, which bounds the optimizer's temporaries.
DS_SUB_GROUP_SIZE = 1_000_000_000


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    how: str
    phase: str = ""  # "": live through the whole step; else only in that phase (MemoryEstimate.total)


@dataclass(frozen=True)
class MemoryEstimate:
    components: tuple[Component, ...]
    notes: tuple[str, ...] = ()

    def phases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.components:
            if c.phase:
                out[c.phase] = out.get(c.phase, 0) + c.bytes
        return out

    @property
    def total(self) -> int:
        """The peak: what lives through the step, plus the larger of the forward-backward (the activations and
        the larger of the loss head's and a layer backward's transients) and the optimizer step's temporaries.
        Without phases (inference) the sum."""
        p = self.phases()
        forward_backward = p.get(ACTIVATIONS, 0) + max(p.get(LOSS_PHASE, 0), p.get(LAYER_PHASE, 0))
        return (sum(c.bytes for c in self.components if not c.phase)
                + max(forward_backward, p.get(OPTIMIZER_PHASE, 0)))

    def get(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)


@dataclass(frozen=True)
class ZeroBuffers:
    """The ZeRO-3 settings that size DeepSpeed's buffers: the run's DeepSpeed JSON, else DeepSpeed's defaults."""

    reduce_bucket_size: int = DS_REDUCE_BUCKET
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET
    param_persistence_threshold: int = DS_PERSISTENCE_THRESHOLD
    contiguous_gradients: bool = True
    offload_optimizer: bool = False  # zero_optimization.offload_optimizer.device cpu/nvme: states off the GPU
    offload_param: bool = False  # offload_param.device cpu/nvme: partitioned weights off the GPU too
    sub_group_size: int = DS_SUB_GROUP_SIZE
    # ZeRO-3's zero.Init replaces torch.nn.functional.linear for the process (memory_efficient_linear, on by
    # default) with an autograd function that saves every linear layer's input, frozen weight or not.
    memory_efficient_linear: bool = True

    @classmethod
    def from_ds_config(cls, ds: dict[str, Any]) -> "ZeroBuffers":
        z = ds.get("zero_optimization") or {}

        def num(key: str, default: int, alias: str | None = None) -> int:
            value = z.get(key, z.get(alias, default) if alias else default)
            return int(float(value)) if isinstance(value, (int, float, str)) and str(value) != "auto" else default

        return cls(reduce_bucket_size=num("reduce_bucket_size", DS_REDUCE_BUCKET),
                   prefetch_bucket_size=num("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET, "prefetch_bucket_size"),
                   param_persistence_threshold=num("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD,
                                                   "param_persistence_threshold"),
                   contiguous_gradients=bool(z.get("contiguous_gradients", True)),
                   offload_optimizer=_offloaded(z.get("offload_optimizer")),
                   offload_param=_offloaded(z.get("offload_param")),
                   sub_group_size=num("sub_group_size", DS_SUB_GROUP_SIZE),
                   memory_efficient_linear=bool(z.get("memory_efficient_linear", True)))


def _offloaded(section: Any) -> bool:
    """An ``offload_*`` section that moves its tensors off the GPU (device cpu or nvme; none or absent: not)."""
    return isinstance(section, dict) and str(section.get("device", "none")).lower() in ("cpu", "nvme")


@dataclass(frozen=True)
class TrainSetup:
    """One training worker's step, as the plan sees it."""

    world: int
    zero_stage: int
    param_bytes: int  # working weights and activations: 2 (bf16, GPU) or 4 (fp32, CPU)
    on_cuda: bool
    rows: int  # sequences per micro-batch (1 when packed)
    seq_len: int  # tokens per row
    padded: bool  # an attention mask with padding reaches sdpa (several rows of different lengths)
    checkpointing: bool
    loss_rows: int  # rows the loss reads per micro-batch (CoT + EOS + score rows)
    buffers: ZeroBuffers = field(default_factory=ZeroBuffers)
    tile_bytes: int | None = None  # loss.tile_mib; None: tiling's device default
    triton_loss: bool = True  # CUDA with Triton kernels: no fp32 work block

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


# ---- model states ------------------------------------------------------------------------------------------

def zero3_states(trainable: int, largest_layer: int, world: int, *, offload_optimizer: bool = False,
                 offload_param: bool = False) -> tuple[int, str]:
    """GPU bytes of ZeRO-3 model states by DeepSpeed's estimator (``estimate_zero3_model_states_mem_needs``, the
    function behind ``..._all_cold``): without offload 18 bytes per trainable parameter over the world (16-bit
    weight, fp32 gradient partition, fp32 master weight and two Adam moments) plus 4 bytes per parameter of the
    largest layer (gathered 16-bit weight and gradient); the optimizer offloaded: 2 bytes per parameter over the
    world + the largest layer; parameters offloaded too: the largest layer only. Its own arithmetic (the same)
    when DeepSpeed is not installed (the GPU check machine)."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        per_param = 0 if offload_param else (2 if offload_optimizer else 18)
        return 4 * largest_layer + int(per_param * trainable / world), "DeepSpeed's estimator formula (not installed)"
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=trainable, largest_layer_params=largest_layer, num_gpus_per_node=world, num_nodes=1,
        cpu_offload=offload_optimizer or offload_param, cpu_offload_params=offload_param, zero_init=True)
    return int(gpu), "DeepSpeed's estimate_zero3_model_states_mem_needs"


def model_states(shape: ModelShape, lora: LoraShape | None, s: TrainSetup) -> list[Component]:
    """Weights, gradients and optimizer state of one worker."""
    b, n = s.param_bytes, s.world
    trainable = lora.trainable if lora else shape.params
    frozen = shape.params if lora else 0
    out: list[Component] = []
    if s.zero_stage == 3:
        z = s.buffers
        states, source = zero3_states(trainable, shape.largest_module_params, n,
                                      offload_optimizer=z.offload_optimizer, offload_param=z.offload_param)
        per_param = 0 if z.offload_param else (2 if z.offload_optimizer else 18)
        how = (f"{source}: {per_param} B x {_n(trainable)} trainable / {n} + 4 B x largest layer "
               f"{_n(shape.largest_module_params)}")
        if z.offload_optimizer or z.offload_param:
            how += f" (offloaded to the CPU: the optimizer{' and the parameters' if z.offload_param else ''})"
        if b == FP32 and not z.offload_param:  # the estimator assumes 16-bit working weights
            states += 2 * trainable // n + 4 * shape.largest_module_params
            how += "; fp32 working weights: +2 B per trainable parameter / world, +4 B per largest-layer parameter"
        out.append(Component("model states", states, how))
        if not z.offload_optimizer:
            # Per optimizer sub-group (the partition, at most sub_group_size elements): the fp32 gradient DeepSpeed
            # assembles for the step beside the one the estimator counts (measured on CPU), and torch AdamW's
            # buffers (the project's DeepSpeed JSON sets torch_adam): CUDA's foreach path one (sqrt v), the CPU's
            # per-tensor path two (sqrt v and its quotient).
            k = 2 if s.on_cuda else 3
            group = min(-(-trainable // n), z.sub_group_size)
            out.append(Component("optimizer temporaries", k * FP32 * group,
                                 f"{k} fp32 buffers of an optimizer sub-group ({_n(group)} elements): the step's "
                                 "gradient and AdamW's", OPTIMIZER_PHASE))
        if frozen and not z.offload_param:
            out.append(Component("frozen base weights", b * frozen // n,
                                 f"{b} B x {_n(frozen)} partitioned over {n} (no gradient, no optimizer state)"))
        small = sum(x for x in shape.param_numels if x < s.buffers.param_persistence_threshold)
        if n > 1 and small:
            out.append(Component("whole small tensors", int(b * small * (1 - 1 / n)),
                                 f"ZeRO-3 keeps tensors under {_n(s.buffers.param_persistence_threshold)} elements "
                                 f"whole on every rank: {_n(small)} parameters"))
        return out
    # Stages 0-2: the ZeRO paper's accounting with DeepSpeed's fp32 gradient, master weight and Adam moments.
    opt = 16 * trainable // (n if s.zero_stage >= 1 else 1)
    grads = b * trainable // (n if s.zero_stage >= 2 else 1)
    out.append(Component("model states", b * shape.params + grads + opt,
                         f"ZeRO-{s.zero_stage}: {b} B weights whole, {b} B gradients"
                         f"{' partitioned' if s.zero_stage >= 2 else ''}, 16 B optimizer state per trainable "
                         f"parameter{' partitioned' if s.zero_stage >= 1 else ''}"))
    return out


# ---- activations -------------------------------------------------------------------------------------------

def layer_activation_bytes(shape: ModelShape, lora: LoraShape | None, b: int, *, on_cuda: bool,
                           padded: bool = False, zero3_linear: bool = False) -> int:
    """Bytes per token that one decoder layer saves for backward (no checkpointing), as autograd keeps them for
    transformers' Llama-family layers with sdpa / flash attention (no T x T matrix) and, with ``lora``, PEFT's
    adapters. ``padded``: sdpa gets a padding mask, so transformers repeats the K/V heads up to the query heads
    (``repeat_kv``) instead of sdpa's grouped-query path. ``zero3_linear``: under ZeRO-3's memory-efficient linear
    every linear layer saves its input, frozen or not (LoRA). Measured equal to the byte on CPU without ZeRO-3
    (fp32 and bf16, Llama, Qwen3, Qwen3-MoE, LoRA with and without dropout; +2 % padded) by
    ``benchmarks/plan/bench_plan_memory.py --layers``; the whole ZeRO-3 step by its default mode."""
    f = FP32
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    full = lora is None

    def norm(width: int, rows: int) -> int:  # RMSNorm: fp32 copy of the input, per-row rsqrt, and the normalised
        return (f + (b if full else 0)) * width + f * rows  # copy only when its weight gets a gradient

    total = 2 * norm(h, 1)  # input and post-attention RMSNorm
    if shape.qk_norm:  # Qwen3: RMSNorm over every query and key head
        total += norm(q, shape.heads) + norm(kv, shape.kv_heads)
    total += b * (q + 2 * kv)  # rotated q and k, and v: saved by attention
    total += b * q + f * shape.heads  # attention output (o_proj's input is a view of it) and its log-sum-exp
    if padded:  # K and V repeated to every query head; on CPU the masked kernel's output is copied for o_proj
        total += 2 * b * (q - kv) + (0 if on_cuda else b * q)
    moe = shape.experts > 0
    if moe:  # router softmax (fp32), and per routed token: its gathered input, gate_up out, act, product, down out
        experts_train = full or bool(lora and lora.experts_adapted)
        per_routed = b * (2 * h + 4 * shape.moe_intermediate) if experts_train else b * (
            h + (4 if zero3_linear else 3) * shape.moe_intermediate)  # ZeRO-3: the frozen down input too
        # + per routed token: its routing indices (four int64 tensors) and weight
        total += f * shape.experts + shape.experts_per_token * (per_routed + 32 + b)
    else:
        total += 3 * b * i  # gate output (SiLU's input), SiLU output and up output (the product's inputs)
    # The inputs linear layers save for their weight gradients: y1 (q/k/v), y2 (MLP or router), the product
    # (down_proj); the attention output is saved by attention anyway.
    inputs = {"y1": (h, ("q_proj", "k_proj", "v_proj")), "y2": (h, ("gate_proj", "up_proj", "mlp.gate")),
              "attn": (q, ("o_proj",)), "prod": (0 if moe else i, ("down_proj",))}
    if full:
        total += b * (inputs["y1"][0] + inputs["y2"][0] + inputs["prod"][0])
        return total
    mask = 1 if on_cuda else b  # dropout's saved mask: bool on CUDA (fused kernel), a full noise tensor on CPU
    for key, (width, readers) in inputs.items():
        adapted = [name for name, _ in lora.adapted if name.endswith(readers)]
        if not width:
            continue
        if adapted and lora.dropout > 0:  # each adapter gets its own dropped copy (and mask) of the input
            total += len(adapted) * (mask + b) * width
        # The layer input itself: kept when adapters read it undropped, and under ZeRO-3 by the frozen layers.
        if key != "attn" and (zero3_linear or (adapted and lora.dropout == 0)):
            total += b * width
    total += b * lora.rank * len(lora.adapted)  # each lora_A output, saved by lora_B
    return total


def activation_components(shape: ModelShape, lora: LoraShape | None, s: TrainSetup) -> list[Component]:
    """Activations of one micro-batch: saved by every layer (or only the layer inputs, with checkpointing) and
    the final norm, through the step; in the layer-backward phase one layer's recomputation (checkpointing) and
    its input gradients."""
    b, f, t, h = s.param_bytes, FP32, s.tokens, shape.hidden
    zero3_linear = s.zero_stage == 3 and s.buffers.memory_efficient_linear
    per_layer = layer_activation_bytes(shape, lora, b, on_cuda=s.on_cuda, padded=s.padded, zero3_linear=zero3_linear)
    full = lora is None
    out = []
    if s.checkpointing:
        out.append(Component("activations (checkpoints)", shape.layers * b * h * t,
                             f"{shape.layers} layers x their input ({b} B x hidden {h}) x {t} tokens", ACTIVATIONS))
        out.append(Component("activations (one layer recomputed)", per_layer * t,
                             f"{per_layer} B per token (the layer's saved tensors) x {t} tokens", LAYER_PHASE))
    else:
        out.append(Component("activations (saved by layers)", shape.layers * per_layer * t,
                             f"{shape.layers} layers x {per_layer} B per token x {t} tokens", ACTIVATIONS))
    final = (f + (b if full else 0)) * h + f
    out.append(Component("activations (final norm)", final * t, f"final RMSNorm {final} B per token x {t}",
                         ACTIVATIONS))
    i = shape.moe_intermediate * shape.experts_per_token if shape.experts else shape.intermediate
    backward = b * (2 * i + 2 * h) + f * h
    out.append(Component("backward transients", backward * t,
                         f"one layer's input gradients {backward} B per token x {t}", LAYER_PHASE))
    if s.padded:
        out.append(Component("attention mask", s.rows * s.seq_len ** 2,
                             f"boolean {s.rows} x {s.seq_len} x {s.seq_len}, shared by the layers", ACTIVATIONS))
    return out


# ---- the fused loss head -----------------------------------------------------------------------------------

def loss_components(shape: ModelShape, lora: LoraShape | None, s: TrainSetup) -> list[Component]:
    """The fused CoT-RAFT head: its logits tile (``tract_dist.loss.tiling``), the gathered rows and their gradient,
    and the lm_head's weight gradient, which the loss computes in its forward (full fine-tuning only)."""
    from tract_dist.loss import tiling

    b, f, h, v, n = s.param_bytes, FP32, shape.hidden, shape.vocab, max(s.loss_rows, 1)
    budget = s.tile_bytes or (tiling.CUDA_TILE_BYTES if s.on_cuda else tiling.CPU_TILE_BYTES)
    shard = tiling.vocab_shard_size(v, None)
    chunk = tiling.chunk_rows(n, min(shard, v), b, budget, None)
    tile = min(chunk, n) * min(shard, v) * b
    multi_shard = shard < v
    out = [Component("loss tile", tile, f"{min(chunk, n)} rows x {min(shard, v)} vocabulary rows x {b} B "
                                        f"(budget {budget / 2**20:.0f} MiB)", LOSS_PHASE)]
    out.append(Component("final hidden states", s.tokens * h * b,
                         f"{s.tokens} tokens x hidden {h} x {b} B: the head's input, alive through the loss forward",
                         LOSS_PHASE))
    rows = 3 * n * h * b + (n * h * f if multi_shard else 0)
    out.append(Component("loss rows", rows, f"{n} rows x hidden {h}: gathered twice (the loss rows, the active "
                                            f"ones), their gradient"
                                            f"{', an fp32 partial sum over vocabulary shards' if multi_shard else ''}",
                         LOSS_PHASE))
    if not s.on_cuda or not s.triton_loss:  # the PyTorch tile ops' fp32 work blocks (tiling.block_rows)
        elements = tiling.CUDA_BLOCK_ELEMENTS if s.on_cuda else tiling.CPU_BLOCK_BYTES // f
        rows_per_block = max(1, min(min(chunk, n), elements // min(shard, v)))
        # A block's log_softmax is allocated while the previous block's is still bound (when the tile has more
        # than one block), and a 16-bit tile is first copied to fp32 for it.
        blocks = (2 if min(chunk, n) > rows_per_block else 1) + (1 if b != f else 0)
        out.append(Component("loss work blocks", blocks * rows_per_block * min(shard, v) * f,
                             f"{blocks} fp32 work blocks of {rows_per_block} rows (the PyTorch tile ops)",
                             LOSS_PHASE))
    if lora is None:  # the head is trained: its gradient exists from the loss forward until backward hands it over
        single = n <= chunk
        out.append(Component("lm_head gradient", v * h * (b if single else f),
                             f"{v} x {h} x {b if single else f} B ({'one chunk' if single else 'fp32 accumulator'})",
                             LOSS_PHASE))
    return out


def buffer_components(shape: ModelShape, s: TrainSetup) -> list[Component]:
    """DeepSpeed ZeRO-3's own buffers: the contiguous gradient bucket (allocated whole at start-up, whatever the
    model's size) and the parameters gathered ahead of the layer running (at most the prefetch bucket)."""
    if s.zero_stage != 3:
        return []
    b, z = s.param_bytes, s.buffers
    out = []
    if z.contiguous_gradients:
        out.append(Component("DeepSpeed gradient bucket", z.reduce_bucket_size * b,
                             f"reduce_bucket_size {_n(z.reduce_bucket_size)} x {b} B"))
    ahead = min(z.prefetch_bucket_size, shape.params)
    out.append(Component("DeepSpeed prefetch", ahead * b,
                         f"min(stage3_prefetch_bucket_size, parameters) {_n(ahead)} x {b} B"))
    return out


def training_memory(shape: ModelShape, lora: LoraShape | None, s: TrainSetup) -> MemoryEstimate:
    comps = (model_states(shape, lora, s) + buffer_components(shape, s) + activation_components(shape, lora, s)
             + loss_components(shape, lora, s))
    notes = []
    if lora is not None and lora.experts_adapted:
        notes.append("PEFT adapts the MoE experts' 3D weights (all-linear): it builds every expert's full delta "
                     "weight each forward, which this plan does not count; adapt the attention projections only")
    return MemoryEstimate(tuple(comps), tuple(notes))


# ---- inference ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceSetup:
    backend: str  # vllm or hf
    tp: int
    dtype_bytes: int
    context: int  # tokens per sequence the engine must hold (vLLM: max_model_len)
    concurrency: int  # sequences decoded together
    shared_prefix: int = 0  # prompt tokens shared by a prompt's n CoTs (prefix caching)
    cots_per_prompt: int = 1
    utilization: float = 0.9  # vLLM gpu_memory_utilization
    kv_cache_bytes: int | None = None  # vLLM kv_cache_memory_gb, if set
    max_num_seqs: int = 1024  # vLLM's default on >= 70 GiB GPUs (engine/arg_utils.py, LLM class)
    max_batched_tokens: int = 16384  # vLLM's default on >= 70 GiB GPUs


def kv_bytes_per_token(shape: ModelShape, b: int, tp: int) -> int:
    """One token's K and V in every layer on one tensor-parallel rank (KV heads are split, or replicated when
    there are fewer than ranks)."""
    return 2 * shape.layers * max(1, math.ceil(shape.kv_heads / tp)) * shape.head_dim * b


def inference_memory(shape: ModelShape, s: InferenceSetup, device_bytes: float) -> tuple[MemoryEstimate, dict]:
    """One replica's per-GPU memory and its KV-cache budget: (estimate, {kv capacity and need in tokens})."""
    b, tp = s.dtype_bytes, s.tp
    weights = shape.params * b // tp
    kv_tok = kv_bytes_per_token(shape, b, tp)
    h, i = shape.hidden, (shape.moe_intermediate * shape.experts_per_token if shape.experts else shape.intermediate)
    need_tokens = s.concurrency * s.context
    if s.shared_prefix and s.cots_per_prompt > 1:
        prompts = max(1, s.concurrency // s.cots_per_prompt)
        need_tokens = prompts * (s.shared_prefix + s.cots_per_prompt * (s.context - s.shared_prefix))
    comps = [Component("weights", weights, f"{_n(shape.params)} x {b} B / tensor-parallel {tp}")]
    if s.backend == "vllm":
        act_tok = (2 * h + (2 * shape.q_dim + 2 * shape.kv_dim + 3 * i) // tp) * b
        work = s.max_batched_tokens * act_tok + 3 * min(s.max_num_seqs, s.max_batched_tokens) * shape.vocab * FP32
        comps.append(Component("engine workspace", work,
                               f"a forward of max_num_batched_tokens {s.max_batched_tokens} ({act_tok} B per token) "
                               f"+ fp32 logits of {min(s.max_num_seqs, s.max_batched_tokens)} sequences (x3)"))
        comps.append(Component("CUDA graphs, NCCL, context", VLLM_OVERHEAD_BYTES, "fixed allowance"))
        budget = s.kv_cache_bytes if s.kv_cache_bytes is not None else (
            s.utilization * device_bytes - weights - work - VLLM_OVERHEAD_BYTES)
        budget = max(int(budget), 0)
        comps.append(Component("KV cache (vLLM's pool)", budget,
                               "kv_cache_memory_gb" if s.kv_cache_bytes is not None else
                               f"gpu_memory_utilization {s.utilization} x device - the rest"))
        capacity = budget // kv_tok
    else:
        kv = need_tokens * kv_tok
        comps.append(Component("KV cache", kv, f"{s.concurrency} sequences x {s.context} tokens x {kv_tok} B"))
        act = s.concurrency * s.context * (2 * h + 2 * shape.q_dim + 3 * i) * b // max(shape.layers, 1)
        act = max(act, s.concurrency * s.context * (2 * h + 3 * i) * b)
        comps.append(Component("prefill activations", act, "one layer's forward over the batch, no gradient"))
        comps.append(Component("logits", 3 * s.concurrency * shape.vocab * FP32,
                               "last-position logits and their softmax (logits_to_keep=1)"))
        capacity = need_tokens
    return MemoryEstimate(tuple(comps)), {"kv_bytes_per_token": kv_tok, "kv_capacity_tokens": int(capacity),
                                          "kv_needed_tokens": int(need_tokens), "context": s.context}


def _n(x: float) -> str:
    """A count in words people read: 1.23B, 456.7M, 12.3K."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.4g}{unit}"
    return f"{x:g}"
