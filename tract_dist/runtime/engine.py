"""The one inference interface that generation, the judge and evaluation use, whatever runs behind it.

Two operations cover every inference stage of TRACT:

- ``generate(prompts, seeds, params)``: one continuation per prompt (token ids in, text out), row i sampled with
  ``seeds[i]`` only, stopped by EOS, ``params.stop`` strings or ``params.max_new_tokens``. Stage-2 CoT generation,
  CoT-RAIL's CoTs and the decode baseline all call it.
- ``score_probs(sequences, token_ids)``: the full-vocabulary probability of each of ``token_ids`` as the next
  token after the last token of each sequence. The RAIL read-out (ŷ = Σ_k v_k p_k) needs exactly this.

Backends: :class:`tract_dist.runtime.hf_engine.HFEngine` (transformers ``generate``, static left-padded batches)
and :class:`tract_dist.runtime.vllm_engine.VLLMEngine` (continuous batching, prefix caching, tensor parallelism,
unmerged LoRA). Both return the text *including* a stop string that ended it, so :func:`extract_cot` cuts the
CoT the same way whichever backend wrote it. :class:`EngineSpec` is the plain-data recipe for one engine: it is
pickled to every Ray actor, which builds its engine with :func:`tract_dist.runtime.backend.build_engine`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tract_dist.data.prompts import normalize_feedback
from tract_dist.protocol import DANGLING_SCORE_RE
from tract_dist.runtime.deadline import StopSignal
from tract_dist.runtime.sampling import SamplingParams

BACKENDS: tuple[str, ...] = ("hf", "vllm")


@dataclass
class Generation:
    text: str  # decoded new tokens (special tokens removed), including the stop string that ended it, before any cut
    new_tokens: int  # generated tokens up to and including the stop/EOS token
    finish_reason: str  # "eos", "stop" (a stop string), "length", or "deadline" / "cancelled" (its StopSignal)


class InferenceEngine(Protocol):
    """What every backend provides (structural: no base class to inherit)."""

    backend: str
    tokenizer: Any

    def generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                 stops: list[StopSignal | None] | None = None) -> list[Generation]:
        """One continuation per prompt, in input order; row i ends early, with ``finish_reason`` "deadline" or
        "cancelled", once ``stops[i]`` fires (:mod:`tract_dist.runtime.deadline`)."""
        ...

    def score_probs(self, sequences: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Full-vocabulary p(token_ids[k] | sequence) at the position after each sequence's last token."""
        ...


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine settings (``generation.vllm.*``); None means vLLM's default or the rule in ``vllm_engine``."""

    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float | None = None  # None: vLLM's own sizing on GPU, 1 GiB on CPU
    enable_prefix_caching: bool = True  # n CoTs of one prompt and their RAIL read-out share the prompt's KV blocks
    enforce_eager: bool | None = None  # None: eager on CPU (no graph capture there), CUDA graphs on GPU
    max_model_len: int | None = None  # None: the model's own maximum
    max_num_seqs: int | None = None  # None: vLLM's default
    max_lora_rank: int | None = None  # None: the adapter's rank
    seed: int = 0  # engine seed (unseeded requests only; every project request carries its own seed)


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to build one engine, as plain data (it travels to Ray actors)."""

    backend: str  # "hf" or "vllm" (already resolved: see backend.resolve_backend)
    model_path: str  # an HF folder or hub name (aliases are materialised by the driver), or a PEFT adapter folder
    tokenizer: str | None = None  # None: the model folder's own
    dtype: str = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    batch_size: int = 8  # HF: rows per generate()/forward call; vLLM: schedules everything it is given at once
    torch_threads: int | None = None  # CPU threads for this engine (a replica's share of the cores)
    device: str | None = None  # HF only; None: CUDA when available
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineSpec":
        d = dict(d)
        d["vllm"] = VllmOptions(**d.get("vllm", {}))
        return cls(**d)

    def key(self) -> tuple[Any, ...]:
        """What makes two specs the same engine (batch size and threads are per-call settings, not weights)."""
        return (self.backend, self.model_path, self.tokenizer, self.dtype, self.attn_implementation,
                self.trust_remote_code, self.tensor_parallel_size, self.device, self.vllm)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def extract_cot(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """A generated text as a CoT that ends before the score: cut at stop strings, then normalise like training data.

    The official TRACT code stops generation at "[RESULT]" and cuts the CoT at "So the overall" (FIDELITY.md);
    ``generation.stop`` holds both (``protocol.STOP_STRINGS``), and both backends return the stop string inside
    the text, so the cut is here.
    """
    return DANGLING_SCORE_RE.sub("", normalize_feedback(cut_at_stop(text, stop))).strip()
