"""REAL's training loop in one worker: rollouts on long-lived engines -> RLOO advantages -> updates -> LoRA
hand-over, with the TRACT recipe's set-up, DeepSpeed strategy, checkpoints, resume, export and hooks.

A round (one ``step``): rank 0 asks the rollout pool (:mod:`.rollout`) for ``real.k`` CoTs of each of the
round's ``real.prompts_per_step`` prompts, with seeds that are a pure function of (``real.seed``, prompt id,
round, sample index), and broadcasts the samples (token ids, read-outs, sampling log-probs: a few KB per sample)
to the other ranks with ``torch.distributed.broadcast_object_list``. Every rank computes the same rewards and
advantages, trains on its contiguous share of the samples (``training.micro_batch_size`` per micro-batch; the
driver sets ``gradient_accumulation_steps`` so a rank's share is one optimizer step) for
``real.updates_per_round`` optimizer steps, then the ranks gather the LoRA weights (ZeRO-3
``GatheredParameters``) and rank 0 hands them to the engines. Loss denominators are the round's global counts
(CoT tokens, samples) as in TRACT training. A checkpoint holds the round reached; a resumed run draws the next
round's prompts and CoTs with the same seeds, from the same weights.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from tract_dist.console import TERMINAL
from tract_dist.train.hooks import STEP_BEGIN
from tract_dist.train.recipe import TrainRecipe

log = logging.getLogger(__name__)


GATHER_ELEMENTS = 1 << 28
"""Parameters gathered at once for a full-weight hand-over (268M elements: 512 MB in bf16 per rank), so a
70B-class policy's hand-over never needs its whole model on one device."""


class RealRecipe(TrainRecipe):
    """The REAL stage in one worker: ``setup()``, ``train()``, ``cleanup()`` as for TRACT's stages."""

    CONSOLE = ("reward_mean", "abs_err_mean", "adv_std", "tie_share", "kl", "clip_share", "logp_gap", "loss",
               "grad_norm", "cot_tokens_mean", "rollout_samples_per_s", "update_samples_per_s")
    """The metrics of the console line (every metric goes to metrics.jsonl and MLflow)."""

    def _check_resume(self, resume: str | None) -> None:
        from tract_dist.train.session import CheckpointError

        self.resumed_world = self.resume_from.world_size if self.resume_from is not None else None
        if self.resumed_world not in (None, self.world):  # REAL's engine is not built for the universal format
            raise CheckpointError(f"checkpoint {resume} is of {self.resumed_world} workers; REAL resumes on the "
                                  f"same number ({self.world} now): set cluster.num_workers, or --fresh")

    def _setup_more(self, timed: Callable[..., None]) -> None:
        timed("setup_rollouts", self._setup_rollouts)

    def _setup_line(self) -> str:
        r = self.cfg.real
        where = f"resumed at round {self.start_step}" if self.start_step else "from the initial model"
        return (f"[real] {r.steps} rounds x {r.prompts_per_step} prompts x {r.k} CoTs ({len(self.examples)} "
                f"prompts, {self.dropped} too long), {r.updates_per_round} update(s) per round, world "
                f"{self.world}, {r.rollout_workers} rollout engine(s) ({self.plan.launcher}), {where}; "
                f"{self.n_params / 1e6:.1f}M params")

    def _log_step(self, done: int, metrics: dict[str, float], *, to_tracking: bool) -> None:
        if self.rank != 0:
            return
        import json

        from tract_dist.tracking import log_metrics

        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": done, **metrics}) + "\n")
        if to_tracking:
            log_metrics(self.handle, metrics, step=done)
            log.info(f"[real] round {done}/{self.steps.total_steps} " + " ".join(
                f"{k}={metrics[k]:.4g}" for k in self.CONSOLE if k in metrics), extra=TERMINAL)

    # ---- data: prompts, not encoded CoTs ----------------------------------------------------------
    def _setup_data(self) -> None:
        from tract_dist.data.assets import load_tokenizer
        from tract_dist.data.encode import DroppedExample, EncodeOptions
        from tract_dist.data.formats import read_examples
        from tract_dist.data.score_tokens import parse_scale
        from tract_dist.real.batch import RealEncoder
        from tract_dist.train.data import StepPlan, load_score_tokens
        from tract_dist.train.recipe import _tokenizer_source

        cfg, r = self.cfg, self.cfg.real
        d = cfg.data
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or _tokenizer_source(cfg))
        self.score_tokens = load_score_tokens(self.run_dir)
        if not self.score_tokens.token_ids:  # prepared with a multi-token scale (#29): REAL reads one score token
            from tract_dist.data.score_tokens import ScoreTokenError

            raise ScoreTokenError(f"data.scale {d.scale} has values of several tokens for this tokenizer; REAL "
                                  "(train-real) needs a scale whose values are single tokens")
        scale = parse_scale(d.scale)
        read = read_examples(d.train_path, d.train_format, scale=scale, skip_invalid=d.skip_invalid,
                             require_feedback=False, limit=d.max_examples, split=d.split)
        enc = RealEncoder(self.tokenizer, self.score_tokens,
                          EncodeOptions(max_length=d.max_length, truncation=d.truncation,
                                        system_prompt=d.system_prompt, scale=scale), r.max_new_tokens)
        self.examples, self.prompts, self.dropped = [], [], 0
        for ex in read.examples:
            try:
                self.prompts.append(enc.prompt_ids(ex))
                self.examples.append(ex)
            except DroppedExample:
                self.dropped += 1
        if len(self.examples) < r.prompts_per_step:
            raise ValueError(f"{d.train_path}: {len(self.examples)} prompts fit data.max_length {d.max_length} with "
                             f"real.max_new_tokens {r.max_new_tokens} ({self.dropped} dropped), fewer than "
                             f"real.prompts_per_step {r.prompts_per_step}")
        # the round's prompts: StepPlan's seeded epoch order, one "rank" (rank 0 rolls out for everyone)
        self.steps = StepPlan(len(self.examples), r.prompts_per_step, r.seed, 1.0, r.steps)
        self.n_ce = None

    def _setup_model(self) -> None:
        from tract_dist.loss.options import CoTRaftLossOptions
        from tract_dist.models import CotRaftCausalLM
        from tract_dist.train.model_init import load_training_model, training_dtype
        from tract_dist.train.schedule import lr_lambda
        from tract_dist.train.strategy import build_ds_config, parameter_counts

        cfg, t, r = self.cfg, self.cfg.training, self.cfg.real
        bf16 = training_dtype(cfg.model.dtype, self.use_cuda) == torch.bfloat16
        ds_config = build_ds_config(t, self.world, bf16=bf16, gpu=self.use_cuda)
        self.strategy.partition_at_load(ds_config)
        self.model = load_training_model(cfg, self.tokenizer, use_cuda=self.use_cuda)
        loss_options = CoTRaftLossOptions.from_config(cfg.loss, self.score_tokens.token_ids, self.score_tokens.scores)
        wrapper = CotRaftCausalLM(self.model, loss_options)
        self.strategy.prepare(wrapper, ds_config,
                              lr_lambda(t.lr_scheduler, r.steps * r.updates_per_round, t.warmup_ratio))
        self.n_params, self.local_params = parameter_counts(wrapper)
        self.params_per_rank = self.strategy.all_gather_int(self.local_params)

    def _setup_rollouts(self) -> None:
        """Rank 0 starts the engines (Ray actors under the Ray launcher) and hands them the current adapter."""
        from tract_dist.real.rollout import RolloutPool

        r = self.cfg.real
        self.pool = None
        if self.rank == 0:
            self.pool = RolloutPool.start(self.cfg.model_dump(), self.cfg.model.name_or_path,
                                          use_ray=self.plan.launcher == "ray", replicas=r.rollout_workers,
                                          cpus=r.rollout_cpus, gpus=r.rollout_gpus, threads=r.rollout_threads)
        t = time.perf_counter()
        self.hand_over(self.start_step)
        self.timings["handover_first"] = time.perf_counter() - t

    # ---- weights to the engines -------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's trainable weights on rank 0 (None elsewhere): the LoRA adapter in PEFT's state-dict format,
        or with full fine-tuning every parameter by name. Every rank must call it (under ZeRO-3 the parameters are
        gathered from their shards, a collective); full weights are gathered a bounded group at a time
        (:data:`GATHER_ELEMENTS`), so no rank ever holds more than one group beyond its own shard on the device."""
        if not self.cfg.model.lora.enabled:
            return self._full_state()
        from peft import get_peft_model_state_dict

        from tract_dist.train.strategy import gathered

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with gathered(trainable, zero3=self.strategy.zero3):
            if self.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).clone()
                    for k, v in get_peft_model_state_dict(self.model).items()}

    def _full_state(self) -> dict[str, torch.Tensor] | None:
        from tract_dist.train.strategy import gathered

        named = list(self.model.named_parameters())  # tied weights once, as the engine's named_parameters
        groups, group, size = [], [], 0
        for n, p in named:
            numel = getattr(p, "ds_numel", p.numel())
            if group and size + numel > GATHER_ELEMENTS:
                groups.append(group)
                group, size = [], 0
            group.append((n, p))
            size += numel
        groups.append(group)
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            with gathered([p for _, p in group], zero3=self.strategy.zero3):
                if self.rank == 0:
                    out.update({n: p.detach().to("cpu").clone() for n, p in group})
        return out if self.rank == 0 else None

    def hand_over(self, version: int) -> float:
        """Gather the adapter and load it into every engine; returns the seconds it took (rank 0)."""
        t = time.perf_counter()
        state = self.adapter_state()
        if self.rank == 0 and self.pool is not None:
            self.pool.load_adapter(state, version)
        self.strategy.barrier()
        return time.perf_counter() - t

    # ---- one round --------------------------------------------------------------------------------
    def _rollout(self, step: int) -> tuple[list[Any], dict[str, float]]:
        from tract_dist.runtime.sampling import example_seed

        r = self.cfg.real
        box: list[Any] = [None, None]
        if self.rank == 0:
            jobs = [{"prompt": j, "prompt_ids": self.prompts[i], "score": float(self.examples[i].score),
                     "seeds": [example_seed(r.seed, f"{self.examples[i].id}\x1fround{step}", s) for s in range(r.k)]}
                    for j, i in enumerate(self.steps.step_indices(step).tolist())]
            box = list(self.pool.rollout(jobs))
        box = self.strategy.broadcast_objects(box, src=0)
        return box[0], box[1]

    def train_step(self, step: int) -> dict[str, float]:
        from tract_dist.real.advantages import regression_rewards, rloo_advantages, tied_prompts
        from tract_dist.real.batch import collate_samples
        from tract_dist.real.objective import surrogate_token_weights
        from tract_dist.train.guards import nonfinite_values, stop_nonfinite
        from tract_dist.train.stats import StepAccumulator

        self.hooks.call(STEP_BEGIN, self._hook_context(step + 1))
        r, t = self.cfg.real, self.cfg.training
        t0 = time.perf_counter()
        samples, timing = self._rollout(step)
        t_roll = time.perf_counter() - t0

        n, k, p = len(samples), r.k, r.prompts_per_step
        yhat = torch.tensor([s.yhat for s in samples], dtype=torch.float64).view(p, k)
        gold = torch.tensor([s.score for s in samples], dtype=torch.float64).view(p, k)
        rewards = regression_rewards(yhat, gold)
        adv = rloo_advantages(rewards, norm=r.advantage_norm, clip=r.advantage_clip).flatten().tolist()
        n_tok = sum(sum(1 for x in s.labels if x != -100) for s in samples)
        den = {"ce_denominator": max(n_tok, 1) / self.world, "mse_denominator": n / self.world, "lam": r.lam}
        per_rank = n // self.world
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        mb = t.micro_batch_size
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        off_policy = r.updates_per_round > 1
        # surrogate, kl, clipped, |ratio - 1|, CoT tokens, |logp_trainer - logp_engine| at the first update
        extra = torch.zeros(6, dtype=torch.float64, device=self.strategy.device)
        acc = StepAccumulator(self.strategy.device)
        norms = []
        lr = self.strategy.lr()
        t1 = time.perf_counter()
        for update in range(r.updates_per_round):
            for start in range(0, per_rank, mb):
                ids = list(mine)[start:start + mb]
                batch = collate_samples([samples[i] for i in ids], [adv[i] for i in ids], pad)
                a, old = batch.pop("adv"), batch.pop("old_logprobs")
                batch = {k_: v.to(self.strategy.device) for k_, v in batch.items()}
                mask = batch["labels"] != -100
                cur = ref = None
                if off_policy or r.beta > 0:
                    with torch.no_grad():
                        cur = self.strategy.module(**batch, token_logprobs=True)
                if r.beta > 0:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref = self.strategy.module(**batch, token_logprobs=True)
                tw = surrogate_token_weights(a.to(self.strategy.device), mask, logp=cur,
                                             old_logp=old.to(self.strategy.device) if off_policy else None,
                                             ref_logp=ref, clip_eps=r.clip_eps, beta=r.beta)
                out = self.strategy.forward({**batch, "ce_token_weights": tw.weights}, den)
                self.strategy.backward(out.loss)
                self.strategy.step()
                acc.add(out, batch)
                gap = ((cur - old.to(cur.device)).abs() * mask).sum() if cur is not None and update == 0 \
                    else extra.new_zeros(())
                extra += torch.stack([tw.surrogate, tw.kl, tw.clipped, tw.ratio_dev, mask.sum(), gap]).double()
            norm = self.strategy.grad_norm()
            norms.append(norm if norm is not None else float("nan"))
        t_upd = time.perf_counter() - t1
        stats = acc.reduce(self.strategy.sum_)
        self.strategy.sum_(extra)
        surrogate, kl, clipped, ratio_dev, toks, gap = extra.tolist()
        u = r.updates_per_round
        t2 = time.perf_counter()
        handover = self.hand_over(step + 1)
        t_hand = time.perf_counter() - t2

        checked = {"loss": stats.loss, "grad_norm": norms[-1]}
        if bad := nonfinite_values(checked):
            ids = [str(self.examples[i].id) for i in self.steps.step_indices(step).tolist()]
            stop_nonfinite(step + 1, bad, ids, self.session, self.run_dir, self.rank, self.plan.invocation)
        err = (yhat - gold).abs()
        new_tokens = torch.tensor([float(s.new_tokens) for s in samples])
        tied = tied_prompts(rewards)
        adv_t = torch.tensor(adv, dtype=torch.float64)
        self.window.add(stats.tokens, t_upd)
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "abs_err_mean": float(err.mean()), "abs_err_std": float(err.std(unbiased=False)),
            "adv_std": float(adv_t.std(unbiased=False)), "adv_abs_mean": float(adv_t.abs().mean()),
            "tie_share": float(tied.double().mean()),
            "kl": kl / max(toks, 1), "surrogate": surrogate / max(toks, 1),
            "clip_share": clipped / max(toks, 1), "ratio_dev": ratio_dev / max(toks, 1),
            # the engine's sampling log-probs against the trainer's at the round's first update (same weights):
            # the LoRA hand-over's check, every round (0 when no no-grad pass runs: on-policy without KL)
            "logp_gap": gap / max(toks / u, 1),
            "cot_tokens_mean": float(new_tokens.mean()),
            "cot_length_share": sum(s.finish_reason == "length" for s in samples) / n,
            "loss": stats.loss / (self.world * u), "ce": stats.ce / (self.world * u),
            "mse": stats.mse / (self.world * u), "mae_trainer": stats.abs_err / (n * u),
            "lr": lr, "grad_norm": norms[-1],
            "rollout_samples_per_s": n / t_roll if t_roll > 0 else 0.0,
            "update_samples_per_s": n * u / t_upd if t_upd > 0 else 0.0,
            "rollout_s": t_roll, "generate_s": float(timing.get("generate_s", 0.0)),
            "score_s": float(timing.get("score_s", 0.0)), "update_s": t_upd, "handover_s": t_hand,
            "handover_rank0_s": handover, "tokens_per_s": self.window.rate(),
            "epoch": (step + 1) / self.steps.steps_per_epoch,
        }

    def cleanup(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        super().cleanup()
