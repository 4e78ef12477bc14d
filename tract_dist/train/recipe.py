"""The training recipe of one worker process, top to bottom: setup -> resume -> steps -> checkpoints -> cleanup.

Ray Train and torchrun run the same recipe (:func:`tract_dist.train.worker.train_worker`); the GPU machines
used for checks have no Ray. DeepSpeed ZeRO-3 partitions the model from load time (every DeepSpeed call is
in :class:`~tract_dist.train.strategy.DeepSpeedStrategy`); the loss is the fused CoT-RAFT loss over the final
hidden states, divided by the counts of the whole global batch (:func:`tract_dist.train.data.loss_denominators`)
so that any split into micro-batches and ranks gives the gradient of one big batch. Where the worker reports
and keeps checkpoints is the session's business (:mod:`tract_dist.train.session`); tests reach into the
recipe only through its hook points (:mod:`tract_dist.train.hooks`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from tract_dist.config import Config
from tract_dist.console import TERMINAL, TERMINAL_ERR
from tract_dist.fsutil import atomic_write_json
from tract_dist.tracking import RunHandle, log_metrics
from tract_dist.train.guards import nonfinite_values, refuse_known_nonfinite, stop_nonfinite
from tract_dist.train.hooks import CHECKPOINT_WRITTEN, MICRO_BATCH, STEP_BEGIN, HookContext, Hooks
from tract_dist.train.plan import WorkerPlan
from tract_dist.train.stats import StepAccumulator, ThroughputWindow, step_metrics
from tract_dist.train.strategy import DeepSpeedStrategy

if TYPE_CHECKING:
    from tract_dist.train.session import TrainingSession

log = logging.getLogger(__name__)


class TrainRecipe:
    """One training stage in one worker. ``setup()``, then ``train()``, then ``cleanup()``."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.cfg = Config.model_validate(plan.config)
        self.run_dir = Path(plan.run_dir)
        uri = os.environ.get("TRACT_DIST_WORKER_TRACKING_URI") or plan.tracking_uri  # torchrun: with its credential
        self.handle = RunHandle(tracking_uri=uri, run_id=plan.run_id)
        self.use_cuda = torch.cuda.is_available() and self.cfg.cluster.use_gpu
        self.strategy = DeepSpeedStrategy(use_cuda=self.use_cuda)
        self.start_step = 0
        self.metrics: dict[str, float] = {}  # the last step's
        self.window = ThroughputWindow()
        # Where this worker's time went (seconds; rank 0's in train_result.json), so a slow stage can be read
        # off its run folder: setup (process group, data, model load, DeepSpeed), steps, checkpoints, export.
        self.timings: dict[str, float] = {"setup": 0.0, "steps": 0.0, "checkpoints": 0.0, "export": 0.0}

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process group, then (the checkpoint to resume read first: its global batch fixes the step plan, and a
        checkpoint of another world size needs an engine that loads DeepSpeed's universal format) data, model and
        the resumed state, then what the recipe adds (:meth:`_setup_more`); each part timed."""
        from tract_dist.train.resume import read_checkpoint_state
        from tract_dist.train.session import CheckpointError

        t0 = time.perf_counter()

        def timed(part: str, step, *args) -> None:
            t = time.perf_counter()
            step(*args)
            self.timings[part] = time.perf_counter() - t

        timed("setup_process", self._setup_process)
        with self.session.resume_dir() as resume:
            try:
                self.resume_from = read_checkpoint_state(resume, self.world) if resume is not None else None
            except ValueError as e:
                raise CheckpointError(f"{e}; remove checkpoint {resume} to resume from the one before, or start "
                                      "afresh with --fresh") from None
            self._check_resume(resume)
            timed("setup_data", self._setup_data)
            timed("setup_model", self._setup_model)
            timed("setup_resume", self._resume, resume)
        self._setup_more(timed)
        self.timings["setup"] = time.perf_counter() - t0
        if self.rank == 0:
            log.info(self._setup_line(), extra=TERMINAL)

    def _check_resume(self, resume: str | None) -> None:
        """Refuse a checkpoint this recipe cannot continue (TRACT's continues any world size)."""

    def _setup_more(self, timed: Callable[..., None]) -> None:
        """Set-up a recipe adds after the model (REAL: its rollout engines)."""

    def _setup_line(self) -> str:
        s = self.steps
        where = f"resumed at step {self.start_step}" if self.start_step else "from the seed model"
        if self.resumed_world not in (None, self.world):
            where += f" (a checkpoint of {self.resumed_world} workers, through DeepSpeed's universal format)"
        mode = (f"packed rows of <= {self.layout.max_tokens} tokens" if self.layout.packing else
                f"padded micro-batches of <= {self.layout.micro_batch_size}"
                + (", grouped by length" if self.layout.group_by_length else ""))
        return (f"[train] {s.total_steps} steps x {s.global_batch} samples ({s.n_examples} examples, "
                f"{s.padded_per_epoch} repeated per epoch to fill the last batch), world {self.world}, {mode}, "
                f"{where}; {self.n_params / 1e6:.1f}M params, {self.local_params / 1e6:.2f}M on this rank")

    def _setup_process(self) -> None:
        """Process group, session (where checkpoints go), hooks; the same initial seed on every rank."""
        from tract_dist.train.session import LocalSession, RaySession

        self.strategy.setup_distributed()
        self.rank, self.world = self.strategy.rank, self.strategy.world_size
        t = self.cfg.training
        self.session: TrainingSession = (RaySession(self.plan.fingerprint) if self.plan.launcher == "ray"
                        else LocalSession(self.run_dir / "checkpoints", keep=t.num_to_keep,
                                          fingerprint=self.plan.fingerprint))
        self.hooks = Hooks(self.plan.hooks)
        _quiet_ray_train_reports()
        refuse_known_nonfinite(self.run_dir, self.plan.invocation)
        torch.manual_seed(t.seed)  # identical initialisation on every rank

    def _setup_data(self) -> None:
        """Tokenizer, the encoded data the driver prepared, the global sample order of every step (its global
        batch: the checkpoint's when resuming, so another world size continues the same run) and how a step's
        samples become this rank's micro-batches."""
        from tract_dist.data.assets import load_tokenizer
        from tract_dist.train.batching import BatchLayout
        from tract_dist.train.data import (StepPlan, encoded_lengths, global_batch_size, load_encoded,
                                           load_score_sequences, load_score_tokens)

        t = self.cfg.training
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer or _tokenizer_source(self.cfg))
        self.data = load_encoded(self.run_dir)
        self.score_tokens = load_score_tokens(self.run_dir)
        self.score_sequences = load_score_sequences(self.run_dir)  # a multi-token scale's value tokens, else None
        self.n_ce = self.data["n_ce"]
        self.lengths = encoded_lengths(self.data)
        resumed = self.resume_from
        self.resumed_world = resumed.world_size if resumed is not None else None
        # the checkpoint's global batch (older checkpoints: the rule at the world size that wrote them)
        batch = (resumed.global_batch or global_batch_size(t, resumed.world_size) if resumed is not None
                 else global_batch_size(t, self.world))
        self.steps = StepPlan(len(self.data), batch, t.seed, t.epochs, t.max_steps)
        self.layout = BatchLayout(world_size=self.world, micro_batch_size=t.micro_batch_size, packing=t.packing,
                                  max_tokens=packed_row_tokens(self.cfg), group_by_length=t.group_by_length)

    def _setup_model(self) -> None:
        """The seed model (partitioned at load under ZeRO-3), the loss wrapper, the engine and the schedule."""
        from tract_dist.loss.options import CoTRaftLossOptions
        from tract_dist.models import CotRaftCausalLM
        from tract_dist.train.model_init import load_training_model, training_dtype
        from tract_dist.train.resume import needs_universal
        from tract_dist.train.schedule import lr_lambda
        from tract_dist.train.strategy import build_ds_config, parameter_counts

        cfg, t = self.cfg, self.cfg.training
        bf16 = training_dtype(cfg.model.dtype, self.use_cuda) == torch.bfloat16
        ds_config = build_ds_config(t, self.world, bf16=bf16, gpu=self.use_cuda,
                                    load_universal=needs_universal(self.resume_from, self.world))
        self.strategy.partition_at_load(ds_config)  # ZeRO-3: from_pretrained/from_config build under zero.Init
        self.model = load_training_model(cfg, self.tokenizer, use_cuda=self.use_cuda)
        # relative grading (data.task): p(A) is the verdict distribution renormalised over {A, B} (data/relative.py)
        loss_options = CoTRaftLossOptions.from_config(cfg.loss, self.score_tokens.token_ids, self.score_tokens.scores,
                                                      score_sequences=self.score_sequences,
                                                      rail_normalize=cfg.loss.rail_normalize
                                                      or cfg.data.task == "relative")
        wrapper = CotRaftCausalLM(self.model, loss_options)
        self.strategy.prepare(wrapper, ds_config, lr_lambda(t.lr_scheduler, self.steps.total_steps, t.warmup_ratio))
        self.n_params, self.local_params = parameter_counts(wrapper)
        self.params_per_rank = self.strategy.all_gather_int(self.local_params)

    def _resume(self, resume: str | None) -> None:
        """Model, optimizer, scheduler, RNG and the data position from the newest good checkpoint, if any.

        A checkpoint of another world size is converted once (rank 0) into DeepSpeed's universal format under
        ``RUN_DIR/universal`` and loaded by every rank from there; the data position is the step (the step plan
        keeps the checkpoint's global batch), and each rank's RNG stream starts afresh from (seed, step, rank)."""
        from tract_dist.train.resume import needs_universal, universal_copy
        from tract_dist.train.session import CheckpointError

        if resume is None:
            torch.manual_seed(self.cfg.training.seed + 1 + self.rank)  # per-rank stream for dropout and the like
            return
        try:
            if needs_universal(self.resume_from, self.world):
                with universal_copy(self.strategy, resume, self.resume_from, self.run_dir) as (folder, tag):
                    self.start_step = int(self.strategy.load(folder, tag)["step"])
            else:
                self.start_step = int(self.strategy.load(resume)["step"])
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read is named, not a traceback
            raise CheckpointError(f"checkpoint {resume} cannot be loaded ({type(e).__name__}: {e}); remove it "
                                  "to resume from the one before, or start afresh with --fresh") from e
        if self.resumed_world == self.world:
            _restore_rng(Path(resume) / f"rng_rank{self.rank}.pt", self.rank)
        else:
            torch.manual_seed(self.cfg.training.seed + 1 + self.rank + 1_000_003 * self.start_step)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        t = self.cfg.training
        for step in range(self.start_step, self.steps.total_steps):
            t0 = time.perf_counter()
            self.metrics = self.train_step(step)
            self.timings["steps"] += time.perf_counter() - t0
            done = step + 1
            save = done % t.save_steps == 0 or done == self.steps.total_steps
            self._log_step(done, self.metrics, to_tracking=done % t.logging_steps == 0 or save)
            if save:
                t0 = time.perf_counter()
                self.save_checkpoint(done, {**self.metrics, "step": done})
                self.timings["checkpoints"] += time.perf_counter() - t0
            elif done % t.logging_steps == 0:
                self.session.report({**self.metrics, "step": done})

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (``step`` 0-based) over every micro-batch of this rank; returns its metrics.
        Stops the run (every rank together) when the all-reduced values are not finite."""
        self.hooks.call(STEP_BEGIN, self._hook_context(step + 1))
        from tract_dist.train.schedule import lam_at

        indices = self.steps.step_indices(step).tolist()
        den = self.steps.loss_denominators(step, self.n_ce, ce_on_score_token=self.cfg.loss.ce_on_score_token,
                                           world_size=self.world)
        lam = lam_at(step, self.cfg.loss.lam, self.cfg.loss.lam_warmup_steps)
        # λ travels with the denominators only while it differs from the options' (warm-up): unchanged calls
        forward_args = {**den.per_rank(), **({"lam": lam} if lam != self.cfg.loss.lam else {})}
        lr = self.strategy.lr()  # the rate this step's update uses
        t0 = time.perf_counter()
        acc = StepAccumulator(self.strategy.device)
        micro_batches = self.layout.rank_batches(indices, self.lengths, self.rank)  # as many on every rank
        for i, micro in enumerate(micro_batches):
            rows = [self.data[j] for j in micro.indices]
            if not micro.filler:
                self.hooks.call(MICRO_BATCH, self._hook_context(step + 1, ids=tuple(str(r["id"]) for r in rows)))
            batch = {k: v.to(self.strategy.device) for k, v in self._collate(rows).items()}
            self.strategy.set_boundary(i == len(micro_batches) - 1)
            out = self.strategy.forward(batch, forward_args)
            self.strategy.backward(out.loss * 0.0 if micro.filler else out.loss)  # a filler: collectives only
            self.strategy.step()
            if not micro.filler:
                acc.add(out, batch)
        stats = acc.reduce(self.strategy.sum_)
        self.window.add(stats.tokens, time.perf_counter() - t0)
        norm = self.strategy.grad_norm()
        checked = {"loss": stats.loss, "ce": stats.ce, "mse": stats.mse}
        if norm is not None and not self.strategy.fp16_enabled():
            checked["grad_norm"] = norm
        if bad := nonfinite_values(checked):
            ids = [str(self.data[i]["id"]) for i in indices]
            stop_nonfinite(step + 1, bad, ids, self.session, self.run_dir, self.rank, self.plan.invocation)
        return step_metrics(stats, world_size=self.world, sequences=den.mse, lr=lr, lam=lam,
                            grad_norm=norm if norm is not None else float("nan"), window=self.window,
                            epoch=(step + 1) / self.steps.steps_per_epoch, n_params=self.n_params,
                            use_cuda=self.use_cuda)

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from tract_dist.train.batching import collate_packed
        from tract_dist.train.data import collate

        return collate_packed(rows) if self.layout.packing else collate(rows, self.tokenizer.pad_token_id)

    def _log_step(self, done: int, metrics: dict[str, float], *, to_tracking: bool) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:  # every step, for analysis
            f.write(json.dumps({"step": done, **metrics}) + "\n")
        if to_tracking:
            log_metrics(self.handle, metrics, step=done)
            log.info(f"[train] step {done}/{self.steps.total_steps} " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"), extra=TERMINAL)

    # ---- checkpoint -----------------------------------------------------------------------------
    def save_checkpoint(self, step: int, metrics: dict[str, Any]) -> None:
        """Write every rank's shards, agree that every rank succeeded, then publish; otherwise remove the partial
        checkpoint and stop, naming the cause and the last good checkpoint (which stays where it was)."""
        from tract_dist.train.resume import CheckpointState
        from tract_dist.train.session import CheckpointError

        error: BaseException | None = None
        ckpt = ""
        try:
            ckpt = self.session.begin(step)
            state = CheckpointState(step=step, world_size=self.world, global_batch=self.steps.global_batch,
                                    fingerprint=self.plan.fingerprint)
            self.strategy.save(ckpt, step, state.client_state())
            torch.save(_rng_state(), Path(ckpt) / f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                state.write(ckpt)
            self.hooks.call(CHECKPOINT_WRITTEN, self._hook_context(step, checkpoint=ckpt))
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below, whatever failed
            error = e
        if not self.strategy.all_ranks_ok(error is None):
            self.session.abort()
            cause = f"{type(error).__name__}: {error}" if error is not None else "a failure on another rank"
            last = self.session.last_good or "none (no checkpoint was written before)"
            raise CheckpointError(f"checkpoint of step {step} could not be written ({cause}); it was removed and "
                                  f"the last good checkpoint is kept: {last}") from error
        self.session.commit(ckpt, step, metrics)

    # ---- cleanup --------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Export a Hugging Face directory consolidated from the ZeRO-3 shards (a collective), then rank 0
        flushes the tracking buffer and writes ``train_result.json``."""
        from tract_dist.tracking import flush
        from tract_dist.train.export import export_model

        export_dir = Path(self.plan.export_dir or self.run_dir / "export")
        t0 = time.perf_counter()
        export_model(self.strategy.consolidated_state_dict(), self.model, self.tokenizer, self.cfg, export_dir,
                     self.rank)
        export_uri = self._publish_export(export_dir) if self.rank == 0 else None
        self.strategy.barrier()
        self.timings["export"] = time.perf_counter() - t0
        peak_rss = self.strategy.max_float(_peak_rss_gb())
        if self.rank == 0:
            flush(self.handle)  # metrics buffered through a tracking outage get their last chance here
            atomic_write_json(self.run_dir / "train_result.json", {
                "export_dir": str(export_dir), "export_uri": export_uri, "steps": self.steps.total_steps,
                "start_step": self.start_step,
                "params_total": self.n_params, "peak_rss_gb": peak_rss, "params_per_rank": self.params_per_rank,
                "world_size": self.world, "resumed_from_world_size": self.resumed_world,
                "global_batch": self.steps.global_batch, "final_metrics": self.metrics,
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()}})

    def _publish_export(self, export_dir: Path) -> str | None:
        """On a URI storage root (``cluster.storage_path``), upload the export's folders with their manifests
        to ``<root>/<run>/export``: this node's disk is not another node's (tract_dist/storage.py)."""
        from tract_dist.storage import is_uri, join, upload_dir

        root = self.cfg.cluster.storage_path
        if not is_uri(root):
            return None
        uri = join(root, self.run_dir.name, "export")
        for name in ("model", "adapter"):
            if (export_dir / name).is_dir():
                upload_dir(export_dir / name, join(uri, name))
        return uri

    def _hook_context(self, step: int, checkpoint: str | None = None, ids: tuple[str, ...] = ()) -> HookContext:
        return HookContext(step=step, rank=self.rank, world_size=self.world, run_dir=self.run_dir,
                           checkpoint=checkpoint, ids=ids)


def run_recipe(plan: WorkerPlan) -> None:
    if plan.recipe == "real":
        from tract_dist.real.recipe import RealRecipe

        recipe: TrainRecipe = RealRecipe(plan)
    else:
        recipe = TrainRecipe(plan)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ``report`` of every rank at INFO under a file-path logger name."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path, rank: int) -> None:
    if not path.exists():
        if rank == 0:  # another world size wrote this checkpoint: the model and data position are still exact
            log.warning(f"[train] warning: {path.name} is not in the checkpoint; this rank's RNG starts from the "
                        "seed", extra=TERMINAL_ERR)
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def packed_row_tokens(cfg: Config) -> int | None:
    """Tokens per packed row: ``training.max_tokens_per_micro_batch``, else micro_batch_size x data.max_length
    (never more tokens than a full padded micro-batch); None without packing."""
    t = cfg.training
    if not t.packing:
        return None
    return t.max_tokens_per_micro_batch or t.micro_batch_size * cfg.data.max_length


def _tokenizer_source(cfg: Config) -> str:
    from tract_dist.aliases import is_random_model

    if is_random_model(cfg.model.name_or_path):
        raise ValueError(f"model.tokenizer must be set for {cfg.model.name_or_path}")
    return cfg.model.name_or_path
