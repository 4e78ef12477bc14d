"""Every DeepSpeed call of the training recipe behind one small object (OpenRLHF's strategy, smaller).

The recipe never touches the engine directly: process group, ``deepspeed.initialize``, forward with the
step's denominators, backward with the accumulation scaling, the optimizer step, the gradient norm,
checkpoint save/load and the collectives the recipe needs. DeepSpeed is imported only here, and only inside
a worker (the driver imports nothing of it).
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist


class DeepSpeedStrategy:
    """One worker's DeepSpeed engine and process group (CUDA + NCCL, or CPU + gloo)."""

    def __init__(self, *, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
        self.engine: Any = None
        self.scheduler: Any = None
        self._pre_clip_norm: float | None = None

    # ---- process group --------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Join (or, for a plain ``python`` process, form) the process group."""
        import deepspeed

        # DeepSpeed 0.19 calls the torch collectives that torch 2.13 renamed; the notice is not ours to act on.
        warnings.filterwarnings("ignore",
                                message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)`")
        _ensure_env_for_single_process()
        deepspeed.init_distributed(dist_backend="nccl" if self.use_cuda else "gloo")

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def device(self) -> torch.device:
        """Where step statistics and collectives live: NCCL (the GPU backend) has no CPU tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if self.use_cuda else torch.device("cpu")

    # ---- engine ---------------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module, ds_config: dict[str, Any],
                lr_lambda: Callable[[int], float]) -> None:
        """``deepspeed.initialize`` over the trainable parameters, with a LambdaLR schedule."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda))

    @property
    def accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def lr(self) -> float:
        """The rate the next update uses."""
        return self.scheduler.get_last_lr()[0]

    def forward(self, batch: dict[str, torch.Tensor], denominators: dict[str, float]) -> Any:
        return self.engine(**batch, **denominators)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch loss already divided by the step's global denominators.

        Such micro losses' gradients must add up unscaled. DeepSpeed divides by the accumulation steps once:
        in ``backward()`` when the loss it gets is a fresh tensor, otherwise in a hook on the forward's outputs
        (so ``scale_wrt_gas=False`` on the output itself still divides). Multiplying first makes that one
        division cancel out."""
        self.engine.backward(loss * self.accumulation_steps)

    def set_boundary(self, last: bool) -> None:
        """Whether the next micro-batch is the step's last: the recipe owns the accumulation boundary, because a
        packed step has as many micro-batches as its tokens need, not ``gradient_accumulation_steps``."""
        self.engine.set_gradient_accumulation_boundary(last)

    def step(self) -> None:
        """DeepSpeed's step (it updates only at the accumulation boundary). At the boundary, before the update,
        the pre-clipping norm is measured where DeepSpeed keeps none (see :meth:`grad_norm`)."""
        if self.engine.is_gradient_accumulation_boundary():
            self._pre_clip_norm = self._fallback_grad_norm()
        self.engine.step()

    def grad_norm(self) -> float | None:
        """The last update's pre-clipping global gradient norm; None when neither DeepSpeed nor the fallback
        has one."""
        ds_norm = self.engine.get_global_grad_norm()
        value = ds_norm if ds_norm is not None else self._pre_clip_norm
        if value is None:
            return None
        return float(value.item() if hasattr(value, "item") else value)

    def fp16_enabled(self) -> bool:
        """fp16: an overflow is the loss scaler's business (the step is skipped), not a non-finite stop."""
        return bool(self.engine.fp16_enabled())

    def _fallback_grad_norm(self) -> float | None:
        """Pre-clipping gradient norm where DeepSpeed keeps none: without ZeRO and in fp32 it clips through a
        plain ``clip_grad_norm_`` and drops the value (its ZeRO and bf16/fp16 optimizers record it themselves).
        The gradients are already averaged over ranks after the boundary ``backward``, so the local norm is
        global."""
        e = self.engine
        if e.zero_optimization_stage() != 0 or e.fp16_enabled() or e.bfloat16_enabled():
            return None
        norms = [p.grad.detach().double().norm() for p in e.module.parameters() if p.grad is not None]
        # float64: torch's fp32 norm of a multi-million-element gradient drifts by ~1e-4 relative
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, folder: str, step: int, client_state: dict[str, Any]) -> None:
        """This rank's ZeRO shards (model, optimizer, scheduler) under ``folder/step-N``."""
        self.engine.save_checkpoint(folder, tag=f"step-{step}", client_state=client_state)

    def load(self, folder: str, tag: str | None = None) -> dict[str, Any]:
        """Restore model, optimizer and scheduler from ``folder`` (its ``latest`` tag, or ``tag``); return its
        client state. A universal checkpoint (:meth:`to_universal`) needs an engine prepared with
        ``checkpoint.load_universal`` (:func:`tract_dist.train.ds_config.build_ds_config`)."""
        _, client = self.engine.load_checkpoint(folder, tag=tag, load_module_strict=True)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}" + (f" (tag {tag})" if tag else ""))
        return client

    @staticmethod
    def to_universal(tag_dir: str, out_dir: str) -> None:
        """Convert one ZeRO checkpoint (``tag_dir``: every rank's model and optimizer shards) into DeepSpeed's
        universal format in ``out_dir`` (one fp32 tensor and its Adam moments per parameter, partition-free), which
        any number of ranks can load. DeepSpeed's own ``ds_to_universal``, run in this process (no worker pool:
        a worker process may not fork a pool)."""
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        ds_to_universal(argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=1,
                                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                                           inject_missing_state=False))

    # ---- collectives ----------------------------------------------------------------------------
    def all_ranks_ok(self, ok: bool) -> bool:
        """Whether every rank reports ``ok`` (one all-reduce; every rank must call it)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def all_gather_int(self, value: int) -> list[int]:
        out = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([value], device=self.device))
        return [int(x) for x in out]

    def max_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self) -> None:
        dist.barrier()


def _ensure_env_for_single_process() -> None:
    """Let a plain ``python`` process (no torchrun, no Ray) form a world of one."""
    if "RANK" in os.environ or dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
