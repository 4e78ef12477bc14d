"""The vLLM backend: continuous batching, a seed per request, stop strings, prefix caching, tensor parallelism
and unmerged LoRA, behind the same interface as the HF engine.

Why these choices (vllm 0.32, checked in its source):
- Every request carries its own ``SamplingParams(seed=...)``: vLLM gives a seeded request its own generator, so a
  CoT depends on its prompt and seed, not on its batch partners; a rerun or a resumed job writes the same CoT.
- n CoTs of one prompt are n requests with their own seeds (the project's per-(example, CoT) seeds, so a resumed
  job can regenerate one missing CoT alone); with prefix caching they share the prompt's KV blocks, and so does
  the RAIL read-out that follows, whose sequence starts with the same prompt.
- The RAIL read-out is ``SamplingParams(max_tokens=1, logprob_token_ids=ids)``: vLLM computes
  ``log_softmax`` over the full vocabulary in float32 on the raw logits (``logprobs_mode="raw_logprobs"``, the
  default) and gathers the requested ids, so p_k = exp(logprob_k) is the full-vocabulary probability.
- A row with a :class:`~tract_dist.runtime.deadline.StopSignal` (a judge server's deadline or cancellation):
  its requests are added with ``LLMEngine.add_request`` and the engine is stepped here, as ``LLM.generate``
  steps it, aborting (``LLMEngine.abort_request``) each request whose signal has fired; the others run on.
- ``include_stop_str_in_output=True``: the text keeps the stop string, as HF's does, so ``extract_cot`` cuts both.
- The engine core runs in a spawned process: scripts that build an engine need the ``__main__`` guard.
- On CPU vLLM reserves ``gpu_memory_utilization`` of *host* memory for the KV cache unless
  ``kv_cache_memory_bytes`` is given, so 1 GiB is the default there; threads are not pinned (two replicas on one
  machine would otherwise bind the same cores) and number ``torch_threads``.

``vllm`` is imported only when an engine is built, never by modules the driver imports.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

from tract_dist.envvars import temporary_env
from tract_dist.runtime.deadline import StopSignal, fired
from tract_dist.runtime.engine import EngineSpec, Generation
from tract_dist.runtime.sampling import SamplingParams

_CPU_KV_CACHE_GB = 1.0
_LORA_ID = 1  # one adapter per engine: the model being served


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def _vllm_dtype(dtype: str, gpu: bool) -> str:
    """The project's dtype rule (``auto``: bf16 on GPU, fp32 on CPU), spelled for vLLM."""
    if dtype == "auto":
        return "bfloat16" if gpu else "float32"
    return dtype


def engine_kwargs(spec: EngineSpec, gpu: bool) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for ``spec`` (separate from construction so the rules are testable)."""
    from tract_dist.runtime.adapters import adapter_base, adapter_rank

    o = spec.vllm
    base = adapter_base(spec.model_path)
    kw: dict[str, Any] = {
        "model": base or spec.model_path,
        "dtype": _vllm_dtype(spec.dtype, gpu),
        "tensor_parallel_size": spec.tensor_parallel_size,
        "trust_remote_code": spec.trust_remote_code,
        "enable_prefix_caching": o.enable_prefix_caching,
        "enforce_eager": (not gpu) if o.enforce_eager is None else o.enforce_eager,
        "gpu_memory_utilization": o.gpu_memory_utilization,
        "seed": o.seed,
    }
    if spec.tokenizer:
        kw["tokenizer"] = _tokenizer_dir(spec.tokenizer)
    if o.max_model_len:
        kw["max_model_len"] = o.max_model_len
    if o.max_num_seqs:
        kw["max_num_seqs"] = o.max_num_seqs
    kv_gb = o.kv_cache_memory_gb if o.kv_cache_memory_gb is not None else (None if gpu else _CPU_KV_CACHE_GB)
    if kv_gb is not None:
        kw["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
    if spec.tensor_parallel_size > 1:
        kw["distributed_executor_backend"] = "mp"  # the TP workers live on this node, inside this replica's GPUs
    if base is not None:
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=o.max_lora_rank or _lora_rank_slot(adapter_rank(
            spec.model_path)))
    return kw


def _lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM 0.32 accepts (1, 8, 16, 32, 64, 128, 256, 320, 512) that holds ``rank``."""
    return max(8, 1 << math.ceil(math.log2(max(rank, 1))))


def _tokenizer_dir(name: str) -> str:
    """A folder vLLM can load for ``model.tokenizer``: offline aliases are saved as tokenizer folders first."""
    from tract_dist.aliases import TOKENIZER_ALIASES
    from tract_dist.data.assets import alias_tokenizer_dir

    return str(alias_tokenizer_dir(name)) if name in TOKENIZER_ALIASES else name


class VLLMEngine:
    """A ``vllm.LLM`` (optionally with one LoRA adapter) behind the InferenceEngine interface."""

    backend = "vllm"

    def __init__(self, spec: EngineSpec):
        from vllm import LLM

        from tract_dist.models.loading import load_tokenizer_for, materialize_alias
        from tract_dist.runtime.adapters import adapter_base

        self.spec = spec
        gpu = _on_gpu()
        env = {}
        if not gpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if spec.torch_threads:
                env["OMP_NUM_THREADS"] = str(spec.torch_threads)
        kw = engine_kwargs(spec, gpu)
        # The engine core process inherits this process's file descriptors: in a quiet run they are the run's log
        # (console.py), so its warnings, Triton's and the C++ lines go there for the engine's life.
        with temporary_env(env):  # while the engine core process is spawned (it inherits them)
            self.llm = LLM(**kw)
        base = adapter_base(spec.model_path)
        self.lora_request = None
        if base is not None:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", _LORA_ID, spec.model_path)
        self.tokenizer = load_tokenizer_for(materialize_alias(base or spec.model_path), spec.tokenizer,
                                            spec.trust_remote_code)
        self.last_cached_tokens: list[int] = []  # prefix-cache hits of the last call's requests (diagnostics)

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                                 lora_request=self.lora_request)
        self.last_cached_tokens = [int(o.num_cached_tokens or 0) for o in outs]
        return outs

    def _run_stoppable(self, prompts: list[list[int]], params: list[Any],
                       stops: list[StopSignal | None]) -> list[Any | None]:
        """``_run`` with each request aborted once its signal fires (its output is then None). The loop of
        ``LLM.generate`` (add the requests, ``step`` until none is unfinished) with the signals read between
        steps; the requests carry request ids of this call's own, which outputs echo and ``abort_request``
        takes. A row whose signal fired before it was queued is never queued."""
        import uuid

        engine = self.llm.llm_engine
        tag = uuid.uuid4().hex[:12]
        row_of: dict[str, int] = {}
        for i, p in enumerate(prompts):
            if not fired(stops, i):
                rid = f"tract-{tag}-{i}"
                engine.add_request(rid, {"prompt_token_ids": list(p)}, params[i], lora_request=self.lora_request)
                row_of[rid] = i
        outs: list[Any | None] = [None] * len(prompts)
        pending = set(row_of)
        while pending and engine.has_unfinished_requests():
            stop_now = [rid for rid in pending if fired(stops, row_of[rid])]
            if stop_now:
                engine.abort_request(stop_now)
                pending.difference_update(stop_now)
                if not pending:
                    break
            for o in engine.step():
                if o.finished and o.request_id in pending:
                    outs[row_of[o.request_id]] = o
                    pending.discard(o.request_id)
        self.last_cached_tokens = [int(o.num_cached_tokens or 0) if o is not None else 0 for o in outs]
        return outs

    def generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
                 stops: list[StopSignal | None] | None = None) -> list[Generation]:
        """All prompts are handed to the scheduler at once (continuous batching); outputs come back in order.
        A row whose ``stops[i]`` fires is aborted (``finish_reason`` "deadline" or "cancelled", no text)."""
        from vllm import SamplingParams as VSamplingParams

        if not prompts:
            return []
        reqs = [VSamplingParams(temperature=params.temperature, top_p=params.top_p if not params.greedy else 1.0,
                                repetition_penalty=params.repetition_penalty, max_tokens=params.max_new_tokens,
                                seed=None if params.greedy else int(seed), stop=list(params.stop) or None,
                                include_stop_str_in_output=True, skip_special_tokens=True)
                for seed in seeds]
        stoppable = bool(stops) and any(s is not None for s in stops)
        results = []
        for i, o in enumerate(self._run_stoppable(prompts, reqs, stops) if stoppable else self._run(prompts, reqs)):
            if o is None:
                results.append(Generation(text="", new_tokens=0, finish_reason=fired(stops, i) or "cancelled"))
                continue
            c = o.outputs[0]
            if c.finish_reason == "length":
                reason = "length"
            elif isinstance(c.stop_reason, str):
                reason = "stop"
            else:  # None: the EOS token; an int: another stop token id of the generation config (also an EOS)
                reason = "eos"
            if reason != "stop" and params.stop and any(s in c.text for s in params.stop):
                reason = "stop"
            results.append(Generation(text=c.text, new_tokens=len(c.token_ids), finish_reason=reason))
        return results

    def score_probs(self, sequences: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """One decode step per sequence; p_k = exp(full-vocabulary float32 log-softmax at token_ids[k])."""
        from vllm import SamplingParams as VSamplingParams

        if not sequences:
            return []
        req = VSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids), detokenize=False)
        out = []
        for o in self._run(sequences, [req] * len(sequences)):
            lp = o.outputs[0].logprobs[0]
            out.append([math.exp(lp[t].logprob) for t in token_ids])
        return out

    def close(self) -> None:
        """Stop the engine core process (and its TP workers) now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            with contextlib.suppress(Exception):
                core.shutdown()
