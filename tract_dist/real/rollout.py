"""Rollouts for REAL on the project's inference runtime: long-lived engines that sample k CoTs per prompt, read
each out by RAIL and record the sampling policy's log-probs, with the trainer's LoRA adapter handed over each step.

A :class:`RolloutWorker` holds one engine for the whole stage (an HF model with a PEFT LoRA wrapper built like the
trainer's). Under Ray it runs as an actor (``ray.remote``; :class:`RolloutPool` spreads a round's prompts over the
actors and gathers the samples in order); without Ray (torchrun, inline: the GPU check machines) in-process. The
weight hand-over is PEFT's own: the trainer's adapter state dict (``get_peft_model_state_dict``, gathered from the
ZeRO-3 shards) goes once into Ray's object store and every worker loads it with ``set_peft_model_state_dict``;
nothing of the frozen base model moves after start-up. With full fine-tuning every weight makes that trip each
round (HF engines only: ``load_weights``), at the cost ``benchmarks/real/bench_real_step.py`` measures.

Per sample the worker returns the training row the trainer uses (:class:`~tract_dist.real.batch.RealSample`):
the CoT is cut and normalised as every CoT of the project is (:func:`~tract_dist.runtime.engine.extract_cot`) and
re-tokenised with the score phrase, then ONE forward over that row gives both the RAIL read-out ŷ (float64
softmax at the last position, the reward's input) and the log-prob of every CoT token (the sampling log-probs
of the clipped-ratio path). So reward, importance ratios and the trainer's loss all see the same token ids.
Where the re-tokenised CoT differs from the token ids the engine drew (the stop-string cut, whitespace
normalisation), the policy gradient is taken on the re-tokenised CoT: recorded as a known approximation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tract_dist.real.batch import RealEncoder, RealSample

log = logging.getLogger(__name__)


class RolloutWorker:
    """One engine with the policy's LoRA adapter, sampling and scoring CoTs for the trainer: the HF backend (a PEFT
    model built like the trainer's) or vLLM (the base model; each round's adapter a new ``LoRARequest``)."""

    def __init__(self, config: dict[str, Any], model_path: str, threads: int | None = None) -> None:
        from tract_dist import console
        from tract_dist.config import Config
        from tract_dist.data.encode import EncodeOptions
        from tract_dist.data.score_tokens import derive_score_tokens, parse_scale
        from tract_dist.models.loading import load_causal_lm, load_tokenizer_for, materialize_alias
        from tract_dist.runtime.backend import resolve_backend

        console.attach()  # a rollout actor is its process's entry point: the project's console lines reach it
        if threads and not torch.cuda.is_available():
            torch.set_num_threads(threads)
        cfg = Config.model_validate(config)
        self.cfg = cfg
        self.model_path = model_path
        self.threads = threads
        r = cfg.real
        self.backend = resolve_backend(r.rollout_backend, "real.rollout_backend",
                                       gpu=torch.cuda.is_available()).backend
        if self.backend == "vllm" and not cfg.model.lora.enabled:
            raise RuntimeError("real.rollout_backend resolved to vllm, whose engines take the policy as a LoRA "
                               "adapter; full fine-tuning hands every weight to hf engines: set "
                               "real.rollout_backend=hf or model.lora.enabled=true")
        tok = load_tokenizer_for(materialize_alias(model_path), cfg.model.tokenizer)
        self.tokenizer = tok
        self.engine: Any = None
        self._lora_id = 0
        if self.backend == "hf":
            from tract_dist.runtime.hf_engine import HFEngine
            from tract_dist.train.model_init import wrap_lora
            from tract_dist.train.strategy import outside_zero3

            with outside_zero3():  # a whole engine model even beside the in-process trainer's ZeRO-3 switch
                model = load_causal_lm(model_path, dtype=r.rollout_dtype,
                                       attn_implementation=cfg.model.attn_implementation)
                if cfg.model.lora.enabled:
                    model = wrap_lora(model, cfg.model.lora)
            self.engine = HFEngine(model, tok, batch_size=r.rollout_batch_size)
        else:  # vLLM is built at the first hand-over: it needs an adapter folder to enable LoRA with its rank
            import tempfile

            self.adapter_root = Path(tempfile.mkdtemp(prefix="tract-real-lora-"))
        d = cfg.data
        self.st = derive_score_tokens(tok, parse_scale(d.scale))
        self.encoder = RealEncoder(tok, self.st, EncodeOptions(max_length=d.max_length, truncation=d.truncation,
                                                               system_prompt=d.system_prompt, scale=parse_scale(d.scale)),
                                   r.max_new_tokens)
        self.version = -1

    # ---- weights ----------------------------------------------------------------------------------
    def load_adapter(self, state: dict[str, torch.Tensor], version: int) -> int:
        """The trainer's LoRA weights (PEFT's state-dict format): into the HF engine's PEFT model, or written as a
        PEFT adapter folder that vLLM serves as a new ``LoRARequest`` (a new id: vLLM caches adapters by id)."""
        if self.backend == "vllm":
            return self._load_adapter_vllm(state, version)
        if not self.cfg.model.lora.enabled:
            return self.load_weights(state, version)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.engine.model, state)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise RuntimeError(f"rollout worker: adapter keys the engine's model does not have: {unexpected[:5]}")
        self.engine.model.eval()
        self.version = version
        return version

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Full fine-tuning: every trainable weight (the trainer's parameter names, tied weights once) copied into
        the HF engine's model, cast to its dtype. The names must match exactly: a partial copy would leave the
        engine sampling from a policy the trainer does not hold."""
        params = dict(self.engine.model.named_parameters())
        missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unknown:
            raise RuntimeError(f"rollout worker: the handed weights do not match the engine's model (missing "
                               f"{missing[:5]}, unknown {unknown[:5]})")
        for name, value in state.items():
            params[name].copy_(value)
        self.engine.model.eval()
        self.version = version
        return version

    def _load_adapter_vllm(self, state: dict[str, torch.Tensor], version: int) -> int:
        import shutil

        from peft import LoraConfig
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        lora = self.cfg.model.lora
        self._lora_id += 1
        folder = self.adapter_root / f"v{self._lora_id}"
        folder.mkdir(parents=True)
        # the modules the trainer's adapter covers, read off its keys (PEFT resolves "all-linear" at injection)
        targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state if ".lora_" in k})
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                   base_model_name_or_path=self.model_path).save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
        if self.engine is None:
            from dataclasses import fields

            from tract_dist.runtime.engine import EngineSpec, VllmOptions
            from tract_dist.runtime.vllm_engine import VLLMEngine

            v = self.cfg.generation.vllm
            self.engine = VLLMEngine(EngineSpec(
                backend="vllm", model_path=str(folder), tokenizer=self.cfg.model.tokenizer,
                dtype=self.cfg.real.rollout_dtype, torch_threads=self.threads,
                vllm=VllmOptions(**{f.name: getattr(v, f.name) for f in fields(VllmOptions)})))
        self.engine.lora_request = LoRARequest(f"real-{self._lora_id}", self._lora_id, str(folder))
        for old in self.adapter_root.glob("v*"):  # the engine holds older ones in memory or not at all
            if old != folder and int(old.name[1:]) < self._lora_id - 1:
                shutil.rmtree(old, ignore_errors=True)
        self.version = version
        return version

    def prompt_ids(self, examples: list[dict[str, Any]]) -> list[list[int] | str]:
        """Fitted prompt ids per example, or the reason it cannot fit (driver-side counting)."""
        from tract_dist.data.encode import DroppedExample
        from tract_dist.data.schema import JudgeExample

        out: list[list[int] | str] = []
        for e in examples:
            try:
                out.append(self.encoder.prompt_ids(JudgeExample.from_dict(e)))
            except DroppedExample as err:
                out.append(str(err))
        return out

    # ---- one round ----------------------------------------------------------------------------------
    def rollout(self, jobs: list[dict[str, Any]]) -> tuple[list[RealSample], dict[str, float]]:
        """``jobs``: ``{"prompt": i, "prompt_ids": [...], "score": y, "seeds": [k seeds]}``. Returns every job's k
        samples in job order, and the seconds spent generating and scoring."""
        from tract_dist.runtime.engine import extract_cot
        from tract_dist.runtime.sampling import SamplingParams

        r = self.cfg.real
        params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                stop=tuple(self.cfg.generation.stop))
        flat = [(job, seed) for job in jobs for seed in job["seeds"]]
        t0 = time.perf_counter()
        gens = self.engine.generate([job["prompt_ids"] for job, _ in flat], [s for _, s in flat], params)
        t1 = time.perf_counter()
        samples = []
        for (job, _), g in zip(flat, gens):
            ids, labels, lead = self.encoder.sample_row(job["prompt_ids"], extract_cot(g.text, params.stop))
            samples.append(RealSample(prompt=job["prompt"], input_ids=ids, labels=labels,
                                      score_position=len(ids) - 1, score=float(job["score"]), yhat=0.0,
                                      old_logprobs=[], new_tokens=g.new_tokens, finish_reason=g.finish_reason,
                                      lead_masked=lead))
        if self.backend == "vllm":
            scored = score_samples_vllm(self.engine, samples, self.st.token_ids, self.st.scores,
                                        normalize=self.cfg.loss.rail_normalize)
        else:
            scored = [self._score(s) for s in samples]
        for s, (yhat, old) in zip(samples, scored):
            s.yhat, s.old_logprobs = yhat, old
        return samples, {"generate_s": t1 - t0, "score_s": time.perf_counter() - t1}

    def _score(self, s: RealSample) -> tuple[float, list[float]]:
        if self.backend == "vllm":
            return score_samples_vllm(self.engine, [s], self.st.token_ids, self.st.scores,
                                      normalize=self.cfg.loss.rail_normalize)[0]
        return score_sample(self.engine.model, s, self.st.token_ids, self.st.scores,
                            normalize=self.cfg.loss.rail_normalize)

    def close(self) -> None:
        if self.backend == "vllm" and self.engine is not None:
            self.engine.close()


def score_samples_vllm(engine: Any, samples: list[RealSample], token_ids: list[int], values: list[int], *,
                       normalize: bool = False) -> list[tuple[float, list[float]]]:
    """:func:`score_sample` on vLLM, one request per sample under the current ``LoRARequest``: the log-prob of
    every prompt token (``prompt_logprobs=0``: the token's own) gives the labels', and the full-vocabulary
    log-probs at ``token_ids`` after the last token (``logprob_token_ids``) give ŷ."""
    import math

    from vllm import SamplingParams as VSamplingParams

    req = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprob_token_ids=list(token_ids),
                          detokenize=False)
    out = []
    for s, o in zip(samples, engine._run([s.input_ids for s in samples], [req] * len(samples))):
        probs = [math.exp(o.outputs[0].logprobs[0][t].logprob) for t in token_ids]
        yhat = sum(v * p for v, p in zip(values, probs)) / (sum(probs) if normalize else 1.0)
        old = [0.0] * len(s.labels)
        for t, lab in enumerate(s.labels):
            if lab != -100:
                old[t] = float(o.prompt_logprobs[t][s.input_ids[t]].logprob)
        out.append((float(yhat), old))
    return out


@torch.no_grad()
def score_sample(model: Any, s: RealSample, token_ids: list[int], values: list[int], *,
                 normalize: bool = False) -> tuple[float, list[float]]:
    """One forward over a sample: ŷ (float64 softmax at the last position) and each label's log-prob (aligned with
    the labels, 0 elsewhere), from the HF model's own logits at the rows that need them (``logits_to_keep`` as
    indices: never T x V logits)."""
    dev = next(model.parameters()).device
    targets = [t for t in range(1, len(s.labels)) if s.labels[t] != -100]
    rows = torch.tensor([t - 1 for t in targets] + [s.score_position], dtype=torch.long, device=dev)
    ids = torch.tensor([s.input_ids], dtype=torch.long, device=dev)
    logits = model(input_ids=ids, logits_to_keep=rows, use_cache=False).logits[0]
    probs = torch.softmax(logits[-1].to(torch.float64), -1)[torch.tensor(token_ids, device=dev)]
    yhat = float(probs @ torch.tensor(values, dtype=torch.float64, device=dev))
    if normalize:
        yhat /= float(probs.sum())
    old = [0.0] * len(s.labels)
    if targets:
        lp = torch.log_softmax(logits[:-1].to(torch.float64), -1)
        got = lp[torch.arange(len(targets), device=dev), torch.tensor([s.labels[t] for t in targets], device=dev)]
        for t, v in zip(targets, got.tolist()):
            old[t] = v
    return yhat, old


class RolloutPool:
    """The round's prompts spread over long-lived workers (Ray actors, or one in-process worker)."""

    def __init__(self, workers: list[Any], remote: bool) -> None:
        self.workers = workers
        self.remote = remote

    @classmethod
    def start(cls, config: dict[str, Any], model_path: str, *, use_ray: bool, replicas: int, cpus: float,
              gpus: float = 0.0, threads: int | None = None) -> "RolloutPool":
        if not use_ray:
            return cls([RolloutWorker(config, model_path, threads)], remote=False)
        import ray

        actor = ray.remote(RolloutWorker).options(num_cpus=cpus, num_gpus=gpus)
        workers = [actor.remote(config, model_path, threads) for _ in range(replicas)]
        return cls(workers, remote=True)

    def _call(self, method: str, per_worker: list[tuple[Any, ...]]) -> list[Any]:
        if not self.remote:
            return [getattr(w, method)(*args) for w, args in zip(self.workers, per_worker)]
        import ray

        return ray.get([getattr(w, method).remote(*args) for w, args in zip(self.workers, per_worker)])

    def prompt_ids(self, examples: list[dict[str, Any]]) -> list[list[int] | str]:
        return self._call("prompt_ids", [(examples,)])[0]

    def load_adapter(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Every worker loads the same adapter (one object-store copy under Ray)."""
        if self.remote:
            import ray

            ref = ray.put(state)
            self._call("load_adapter", [(ref, version)] * len(self.workers))
        else:
            self._call("load_adapter", [(state, version)] * len(self.workers))

    def rollout(self, jobs: list[dict[str, Any]]) -> tuple[list[RealSample], dict[str, float]]:
        """Contiguous shares of ``jobs`` per worker; samples back in job order; the slowest worker's seconds."""
        n = len(self.workers)
        shares = [jobs[i * len(jobs) // n:(i + 1) * len(jobs) // n] for i in range(n)]
        used = [(w, s) for w, s in zip(self.workers, shares) if s]
        if not self.remote:
            results = [w.rollout(s) for w, s in used]
        else:
            import ray

            results = ray.get([w.rollout.remote(s) for w, s in used])
        samples = [x for r, _ in results for x in r]
        timing = {k: max(t[k] for _, t in results) for k in results[0][1]}
        return samples, timing

    def close(self) -> None:
        if self.remote:
            import ray

            with contextlib.suppress(Exception):  # stop vLLM's engine core before the actor goes
                ray.get([w.close.remote() for w in self.workers], timeout=60)
            for w in self.workers:
                ray.kill(w)
        else:
            for w in self.workers:
                w.close()
        self.workers = []
