"""Every DeepSpeed call of the project behind one module (OpenRLHF's ``DeepSpeedStrategy``, smaller).

The recipes never touch DeepSpeed directly: the DeepSpeed JSON of a run (:func:`build_ds_config`), the ZeRO-3
switch under which transformers builds a model already partitioned (``HfDeepSpeedConfig`` -> ``zero.Init``:
:meth:`DeepSpeedStrategy.partition_at_load`, and :func:`outside_zero3` for a whole model in such a process),
process group, ``deepspeed.initialize``, forward with the step's denominators, backward with the accumulation
scaling, the optimizer step, the gradient norm, parameter counts of a partitioned model, gathering ZeRO-3 shards
(:func:`gathered`, the consolidated export state), checkpoint save/load and the collectives the recipes need.
``deepspeed`` is imported only here (``plan/memory.py`` also calls DeepSpeed's memory estimator, which is
arithmetic), and only inside the functions that need it, so the driver imports nothing of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tract_dist.config import TrainingSection

_WRAPPER_PREFIX = "lm."  # CotRaftCausalLM keeps the HF model as .lm


# ---- the DeepSpeed JSON ---------------------------------------------------------------------------------------
def build_ds_config(t: TrainingSection, world_size: int, *, bf16: bool, gpu: bool,
                    load_universal: bool = False) -> dict[str, Any]:
    """ZeRO-3 (or the configured stage), AdamW without DeepSpeed's C++ ops, clipping, accumulation, from the
    ``training`` section (or the user's ``training.deepspeed_config`` JSON, with "auto" filled in).

    ``load_universal``: the engine will resume from a universal checkpoint (another world size wrote the run's
    checkpoint). The accumulation values only keep DeepSpeed's bookkeeping consistent: the recipe sets the
    boundary of every step itself (packed steps have as many micro-batches as their tokens need)."""
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": t.zero_stage,
            "overlap_comm": gpu,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not t.deepspeed_config:
        return _with_universal(ours, load_universal)
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"training.deepspeed_config: {path} not found")
    user = json.loads(path.read_text())
    return _with_universal(_fill_auto(user, ours), load_universal)


def _with_universal(ds: dict[str, Any], load_universal: bool) -> dict[str, Any]:
    if load_universal:
        ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    return ds


def _fill_auto(user: Any, ours: Any) -> Any:
    """Replace every ``"auto"`` in the user's JSON with our value at the same key (as HF's integration does)."""
    if isinstance(user, dict):
        return {k: (ours.get(k) if v == "auto" and isinstance(ours, dict) else
                    _fill_auto(v, ours.get(k) if isinstance(ours, dict) else None)) for k, v in user.items()}
    return user


# ---- ZeRO-3 parameters, outside an engine ---------------------------------------------------------------------
@contextlib.contextmanager
def outside_zero3() -> Iterator[None]:
    """Build a whole (unpartitioned) model even in a process that keeps transformers' ZeRO-3 switch on (an
    in-process trainer's ``HfDeepSpeedConfig``): the switch is a module-level weak reference, set aside here and
    put back after. For a meta-device model (the plan) and REAL's in-process rollout engine."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def gathered(params: Iterable[torch.nn.Parameter], *, zero3: bool = True,
             modifier_rank: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """ZeRO-3's ``GatheredParameters`` over ``params`` (a collective: every rank enters it); with ``modifier_rank``
    that rank's writes are broadcast on exit. A no-op context when ``zero3`` is false (nothing is partitioned)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def register_external_params(module: torch.nn.Module, params: Iterable[torch.nn.Parameter | None]) -> None:
    """Make ``module``'s ZeRO-3 hooks gather ``params`` around its forward and backward (why:
    :mod:`tract_dist.models.zero3`). Safe before ``initialize`` (registration is by Parameter identity) and a
    no-op where DeepSpeed is not installed (nothing can partition the model there: a plain PyTorch machine)."""
    try:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    except ImportError:
        return
    for param in params:
        if param is not None:
            register_external_parameter(module, param)


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(whole model, this rank's share) in elements; under ZeRO-3 a parameter's local tensor is its partition."""
    params = list(module.parameters())
    return (sum(getattr(p, "ds_numel", p.numel()) for p in params),
            sum(getattr(p, "ds_tensor", p).numel() for p in params))


class DeepSpeedStrategy:
    """One worker's DeepSpeed engine and process group (CUDA + NCCL, or CPU + gloo)."""

    def __init__(self, *, use_cuda: bool) -> None:
        self.use_cuda = use_cuda
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
        self.engine: Any = None
        self.scheduler: Any = None
        self._pre_clip_norm: float | None = None
        self._hf_ds: Any = None  # transformers' ZeRO-3 switch, alive while this strategy is (partition_at_load)

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

    # ---- model and engine -----------------------------------------------------------------------
    def partition_at_load(self, ds_config: dict[str, Any]) -> None:
        """Under ZeRO-3, make every model built from now on in this process (``from_pretrained``/``from_config``)
        be born partitioned (``deepspeed.zero.Init``), so no rank materialises the whole model: transformers' own
        switch, an ``HfDeepSpeedConfig`` kept alive as long as this strategy. Other stages: nothing to do."""
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(ds_config)

    def prepare(self, module: torch.nn.Module, ds_config: dict[str, Any],
                lr_lambda: Callable[[int], float]) -> None:
        """``deepspeed.initialize`` over the trainable parameters, with a LambdaLR schedule."""
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda))

    @property
    def module(self) -> torch.nn.Module:
        """The engine's module: a forward outside the engine's step (no-grad log-probs) still runs ZeRO-3's
        gather hooks, which live on it."""
        return self.engine.module

    @property
    def zero3(self) -> bool:
        """Whether the engine partitions the parameters (ZeRO-3): gathering them is a collective then."""
        return bool(self.engine.zero_optimization_partition_weights())

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole wrapped HF model's state dict on rank 0 (None elsewhere), its ``lm.`` prefix removed. Under
        ZeRO-3 DeepSpeed's own all-gather of the shards (``stage3_gather_16bit_weights_on_model_save``): a
        collective, every rank calls it."""
        e = self.engine
        if self.zero3:
            sd = e._zero3_consolidated_16bit_state_dict()
        else:
            sd = e.module.state_dict() if e.global_rank == 0 else None
        if sd is None:
            return None
        return {k[len(_WRAPPER_PREFIX):]: v.detach().cpu().contiguous() for k, v in sd.items()
                if k.startswith(_WRAPPER_PREFIX)}

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
        ``checkpoint.load_universal`` (:func:`build_ds_config`)."""
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

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (a no-op in a world of one without a process group)."""
        if dist.is_initialized():
            dist.all_reduce(t)
        return t

    def broadcast_objects(self, objects: list[Any], src: int = 0) -> list[Any]:
        """``objects`` as rank ``src`` holds them, on every rank (pickled: for a few KB of metadata per step)."""
        if self.world_size > 1:
            dist.broadcast_object_list(objects, src=src)
        return objects

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
