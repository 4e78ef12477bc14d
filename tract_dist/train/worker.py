"""The training recipe, one worker process: setup -> resume -> train loop -> checkpoint -> export.

A plain function of a picklable dict, so Ray Train (``TorchTrainer(train_loop_per_worker=train_worker)``)
and torchrun (``python -m tract_dist.train.torchrun_main``) run the same code; the GPU machines used for
checks have no Ray. DeepSpeed ZeRO-3 partitions the model from load time; the loss is the fused CoT-RAFT
loss over the final hidden states, normalised by the token / score counts of the whole global batch so that
any split into micro-batches and ranks gives the gradient of one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tract_dist.config import Config
from tract_dist.tracking import RunHandle, log_metrics

# Dense bf16 peak of common cards, for MFU (FLOP/s per GPU).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def train_worker(loop: dict[str, Any]) -> None:
    """Train one stage. ``loop``: config (dict), run_dir (prepared data), tracking (RunHandle fields),
    launcher ("ray" | "local"), fingerprint (of the run: recorded in and checked against every checkpoint),
    invocation (an id of this driver call), and optionally fail_at_step / kill_in_save_at_step (fault
    injection for tests)."""
    cfg = Config.model_validate(loop["config"])
    run_dir = Path(loop["run_dir"])
    tracking = dict(loop["tracking"])
    if os.environ.get("TRACT_DIST_WORKER_TRACKING_URI"):  # torchrun: the URI with its credential, not in loop.json
        tracking["tracking_uri"] = os.environ["TRACT_DIST_WORKER_TRACKING_URI"]
    handle = RunHandle(**tracking)
    use_cuda = torch.cuda.is_available() and cfg.cluster.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")

    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR
    from transformers.integrations import HfDeepSpeedConfig

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.loss.options import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM
    from tract_dist.train.data import StepPlan, collate, load_encoded, load_score_tokens
    from tract_dist.train.ds_config import build_ds_config
    from tract_dist.train.export import export_model
    from tract_dist.train.model_init import load_training_model, training_dtype
    from tract_dist.train.schedule import lr_lambda
    from tract_dist.train.session import CheckpointError, LocalSession, RaySession

    # ---- setup: process group, data, model, engine -------------------------------------------------
    # DeepSpeed 0.19 calls the torch collectives that torch 2.13 renamed; the notice is not ours to act on.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)`")
    _ensure_env_for_single_process()
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    t = cfg.training
    fingerprint = loop.get("fingerprint")
    session = (RaySession(fingerprint) if loop.get("launcher") == "ray"
               else LocalSession(run_dir / "checkpoints", keep=t.num_to_keep, fingerprint=fingerprint))
    _quiet_ray_train_reports()
    _refuse_known_nonfinite(run_dir, loop.get("invocation"))
    torch.manual_seed(t.seed)  # identical initialisation on every rank

    tokenizer = load_tokenizer(cfg.model.tokenizer or _tokenizer_source(cfg))
    data = load_encoded(run_dir)
    score_tokens = load_score_tokens(run_dir)
    n_ce = data["n_ce"]
    plan = StepPlan(len(data), t.micro_batch_size, t.gradient_accumulation_steps, world, t.seed, t.epochs,
                    t.max_steps)

    bf16 = training_dtype(cfg.model.dtype, use_cuda) == torch.bfloat16
    ds_config = build_ds_config(cfg, world, bf16=bf16, gpu=use_cuda)
    hf_ds = HfDeepSpeedConfig(ds_config) if t.zero_stage == 3 else None  # noqa: F841 (alive = zero.Init)
    model = load_training_model(cfg, tokenizer, use_cuda=use_cuda)
    loss_options = CoTRaftLossOptions.from_config(cfg.loss, score_tokens.token_ids, score_tokens.scores)
    wrapper = CotRaftCausalLM(model, loss_options)
    schedule = lr_lambda(t.lr_scheduler, plan.total_steps, t.warmup_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in wrapper.parameters())
    local_params = sum(getattr(p, "ds_tensor", p).numel() for p in wrapper.parameters())
    # Collectives on `device`: NCCL (the GPU backend) has no CPU tensors.
    per_rank = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(per_rank, torch.tensor([local_params], device=device))

    # ---- resume: model, optimiser, scheduler, RNG and the data position ---------------------------
    start_step = 0
    with session.resume_dir() as resume:
        if resume is not None:
            try:
                _, client = engine.load_checkpoint(resume, load_module_strict=True)
                start_step = int(client["step"])
            except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read is named, not a traceback
                raise CheckpointError(f"checkpoint {resume} cannot be loaded ({type(e).__name__}: {e}); remove it "
                                      "to resume from the one before, or start afresh with --fresh") from e
            _restore_rng(Path(resume) / f"rng_rank{rank}.pt", rank)
        else:
            torch.manual_seed(t.seed + 1 + rank)  # per-rank stream for dropout and the like
    if rank == 0:
        where = f"resumed at step {start_step}" if start_step else "from the seed model"
        _console(f"[train] {plan.total_steps} steps x {plan.global_batch} samples ({plan.n_examples} examples, "
              f"{plan.padded_per_epoch} repeated per epoch to fill the last batch), world {world}, {where}; "
              f"{n_params / 1e6:.1f}M params, {local_params / 1e6:.2f}M on this rank")

    # ---- train loop ---------------------------------------------------------------------------------
    fail_at = loop.get("fail_at_step")
    pad_id = tokenizer.pad_token_id
    window = _Window()
    metrics: dict[str, float] = {}
    for step in range(start_step, plan.total_steps):
        if fail_at is not None and step == fail_at and rank == 0 and _first_failure(run_dir):
            raise RuntimeError(f"injected failure at step {step} (fault-tolerance test)")
        idx = plan.step_indices(step)
        ce_den = sum(n_ce[i] for i in idx.tolist()) + (len(idx) if cfg.loss.ce_on_score_token else 0)
        sc_den = len(idx)
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        t0 = time.perf_counter()
        pre_clip_norm = None
        # loss, ce, mse (all x world), |yhat-y| sum, tokens: kept on the device, read once per step
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for micro in range(t.gradient_accumulation_steps):
            rows = [data[i] for i in plan.micro_indices(step, micro, rank)]
            batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
            # DeepSpeed averages gradients over ranks: scale the global denominators by 1/world.
            out = engine(**batch, ce_denominator=ce_den / world, mse_denominator=sc_den / world)
            # The micro losses are already divided by the step's global denominators, so their gradients must
            # add up unscaled. DeepSpeed divides by the accumulation steps once: in backward() when the loss it
            # gets is a fresh tensor, otherwise in a hook on the forward's outputs (so scale_wrt_gas=False on
            # `out.loss` itself still divides). Multiplying first makes that one division cancel out.
            engine.backward(out.loss * t.gradient_accumulation_steps)
            if micro == t.gradient_accumulation_steps - 1:
                pre_clip_norm = _fallback_grad_norm(engine)
            engine.step()
            sums += torch.stack([out.loss.detach(), out.ce, out.mse, _abs_err_sum(out.yhat, batch),
                                 batch["attention_mask"].sum()]).double()
        dist.all_reduce(sums)
        loss_sum, ce_sum, mse_sum, abs_err, tokens = sums.tolist()
        elapsed = time.perf_counter() - t0
        window.add(tokens, elapsed)
        ds_norm = engine.get_global_grad_norm()
        grad_norm = _float(ds_norm if ds_norm is not None else pre_clip_norm)
        # Every rank holds the same all-reduced sums and global norm, so every rank stops here together.
        checked = {"loss": loss_sum, "ce": ce_sum, "mse": mse_sum}
        if (ds_norm is not None or pre_clip_norm is not None) and not engine.fp16_enabled():
            checked["grad_norm"] = grad_norm  # fp16: an overflow is the loss scaler's business (step skipped)
        bad = {k: v for k, v in checked.items() if not math.isfinite(v)}
        if bad:
            _stop_nonfinite(step + 1, bad, [str(data[i]["id"]) for i in idx.tolist()], session, run_dir, rank,
                            loop.get("invocation"))
        metrics = {
            "loss": loss_sum / world, "ce": ce_sum / world, "mse": mse_sum / world,
            "mae": abs_err / sc_den, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": window.rate(),
            "tokens_per_s_per_worker": window.rate() / world, "epoch": (step + 1) / plan.steps_per_epoch,
        }
        if use_cuda:
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["mfu"] = _mfu(n_params, window.rate() / world)
        done = step + 1
        save = done % t.save_steps == 0 or done == plan.total_steps
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:  # every step, for analysis
                f.write(json.dumps({"step": done, **metrics}) + "\n")
        if rank == 0 and (done % t.logging_steps == 0 or save):
            log_metrics(handle, metrics, step=done)
            _console(f"[train] step {done}/{plan.total_steps} " + " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        if save:
            _save_checkpoint(engine, session, done, {**metrics, "step": done}, fingerprint, rank, device, loop,
                             run_dir)
        elif done % t.logging_steps == 0:
            session.report({**metrics, "step": done})

    # ---- export: a Hugging Face directory consolidated from the ZeRO-3 shards ----------------------
    export_dir = Path(loop.get("export_dir") or run_dir / "export")
    export_model(engine, model, tokenizer, cfg, export_dir, rank)
    dist.barrier()
    peak_rss = torch.tensor([_peak_rss_gb()], dtype=torch.float64, device=device)
    dist.all_reduce(peak_rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        from tract_dist.tracking import flush

        flush(handle)  # metrics buffered through a tracking outage get their last chance here
        (run_dir / "train_result.json").write_text(json.dumps(
            {"export_dir": str(export_dir), "steps": plan.total_steps, "start_step": start_step,
             "params_total": n_params, "peak_rss_gb": peak_rss.item(), "params_per_rank": [int(x) for x in per_rank],
             "final_metrics": metrics}, indent=2))


class NonFiniteLossError(RuntimeError):
    """The all-reduced loss or the gradient norm of a step is NaN or infinite; training stopped before saving."""


NONFINITE = "nonfinite.json"


def _stop_nonfinite(step: int, bad: dict[str, float], ids: list[str], session: Any, run_dir: Path, rank: int,
                    invocation: str | None) -> None:
    """Stop the run at a non-finite step: no checkpoint of it (or later) is written; the last good checkpoint
    is pinned so that no later save prunes it; rank 0 records what happened in ``RUN_DIR/nonfinite.json``."""
    last = session.last_good
    values = ", ".join(f"{k}={v}" for k, v in bad.items())
    shown = ", ".join(ids[:32]) + (f", ... ({len(ids)} records)" if len(ids) > 32 else "")
    pinned = ("pinned: later saves will not prune it" if session.launcher == "local"
              else "the driver pins a hard-linked copy when Ray's storage is local")
    where = (f"the last good checkpoint is {last} ({pinned})" if last
             else "no checkpoint was written before it (the run must start from the seed model)")
    msg = (f"non-finite training values at step {step}: {values}; batch record ids: {shown}. Training stopped "
           f"before writing any checkpoint of this step; {where}. Lower training.learning_rate (or raise "
           f"warm-up, check those records) and rerun")
    if last:
        session.pin(last, msg)
    if rank == 0:
        from tract_dist.fsutil import atomic_write_json

        atomic_write_json(run_dir / NONFINITE, {"step": step, "values": {k: str(v) for k, v in bad.items()},
                                                "record_ids": ids, "last_good_checkpoint": last,
                                                "launcher": session.launcher, "invocation": invocation,
                                                "message": msg})
    raise NonFiniteLossError(msg)


def _refuse_known_nonfinite(run_dir: Path, invocation: str | None) -> None:
    """A worker restarted by Ray Train within the same invocation after a non-finite stop would only meet the
    same NaN again (the data and weights are deterministic): fail at once instead of burning the retries."""
    path = run_dir / NONFINITE
    if invocation is None or not path.exists():
        return
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if info.get("invocation") == invocation:
        raise NonFiniteLossError(info.get("message", "non-finite training values (see nonfinite.json)"))


def _all_ranks_ok(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _save_checkpoint(engine: Any, session: Any, step: int, metrics: dict[str, Any], fingerprint: str | None,
                     rank: int, device: torch.device, loop: dict[str, Any], run_dir: Path) -> None:
    """Write every rank's shards, agree that every rank succeeded, then publish; otherwise remove the partial
    checkpoint and stop, naming the cause and the last good checkpoint (which stays where it was)."""
    from tract_dist.train.session import CheckpointError

    error: BaseException | None = None
    ckpt = ""
    try:
        ckpt = session.begin(step)
        engine.save_checkpoint(ckpt, tag=f"step-{step}", client_state={"step": step, "fingerprint": fingerprint})
        torch.save(_rng_state(), Path(ckpt) / f"rng_rank{rank}.pt")
        _maybe_kill_in_save(loop, step, rank, run_dir)
    except Exception as e:  # noqa: BLE001 - every rank must reach the all-reduce below, whatever failed
        error = e
    if not _all_ranks_ok(error is None, device):
        session.abort()
        cause = f"{type(error).__name__}: {error}" if error is not None else "a failure on another rank"
        last = session.last_good or "none (no checkpoint was written before)"
        raise CheckpointError(f"checkpoint of step {step} could not be written ({cause}); it was removed and the "
                              f"last good checkpoint is kept: {last}") from error
    session.commit(ckpt, step, metrics)


def _maybe_kill_in_save(loop: dict[str, Any], step: int, rank: int, run_dir: Path) -> None:
    """Fault injection for tests: SIGKILL the last rank halfway through a save (its shards are written, the
    checkpoint is not published), once per run folder."""
    if loop.get("kill_in_save_at_step") != step or rank != max(0, dist.get_world_size() - 1):
        return
    marker = run_dir / ".injected_kill"
    if marker.exists():
        return
    marker.write_text("1")
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _console(msg: str) -> None:
    """One progress line (sys.stdout directly: Ray Train V2's patched print echoes every line twice)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ``report`` of every rank at INFO under a file-path logger name."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _Window:
    """Tokens per second over the last few steps (the first step includes warm-up)."""

    def __init__(self, size: int = 10):
        self.items: list[tuple[float, float]] = []
        self.size = size

    def add(self, tokens: float, seconds: float) -> None:
        self.items = (self.items + [(tokens, seconds)])[-self.size:]

    def rate(self) -> float:
        tok, sec = (sum(x) for x in zip(*self.items))
        return tok / sec if sec > 0 else 0.0


def _mfu(n_params: int, tokens_per_s_per_gpu: float) -> float:
    """Model FLOPs utilisation with the 6N FLOPs/token estimate (attention FLOPs ignored)."""
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s_per_gpu / peak if peak else float("nan")


def _abs_err_sum(yhat: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of |yhat - y| over the scored examples (yhat has one entry per example with a score position),
    as a device scalar: the step reads all its statistics with one transfer."""
    gold = batch["score_targets"][batch["score_positions"] >= 0]
    return (yhat.detach().double() - gold.double()).abs().sum()


def _peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _fallback_grad_norm(engine: Any) -> float | None:
    """Pre-clipping gradient norm where DeepSpeed keeps none: without ZeRO and in fp32 it clips through a plain
    ``clip_grad_norm_`` and drops the value (its ZeRO and bf16/fp16 optimizers record it themselves). The
    gradients are already averaged over ranks after the boundary ``backward``, so the local norm is global."""
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    norms = [p.grad.detach().double().norm() for p in engine.module.parameters() if p.grad is not None]
    # float64: torch's fp32 norm of a multi-million-element gradient drifts by ~1e-4 relative
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path, rank: int) -> None:
    if not path.exists():
        if rank == 0:  # another world size wrote this checkpoint: the model and data position are still exact
            sys.stderr.write(f"[train] warning: {path.name} is not in the checkpoint; this rank's RNG starts from "
                             "the seed\n")
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _first_failure(run_dir: Path) -> bool:
    """True the first time only (a marker survives the restart), so the injected fault fires once."""
    marker = run_dir / ".injected_failure"
    if marker.exists():
        return False
    marker.write_text("1")
    return True


def _tokenizer_source(cfg: Config) -> str:
    from tract_dist.train.model_init import RANDOM_ALIASES, TINY_ALIAS

    if cfg.model.name_or_path == TINY_ALIAS or cfg.model.name_or_path in RANDOM_ALIASES:
        raise ValueError(f"model.tokenizer must be set for {cfg.model.name_or_path}")
    return cfg.model.name_or_path


def _ensure_env_for_single_process() -> None:
    """Let a plain ``python`` process (no torchrun, no Ray) form a world of one."""
    if "RANK" in os.environ or dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
