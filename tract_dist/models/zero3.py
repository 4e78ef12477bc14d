"""Let ZeRO-3 manage the lm_head weight that the fused loss reads outside the lm_head's forward.

DeepSpeed ZeRO-3 gathers a parameter only around the forward and the backward of a module that
owns it (module hooks). The fused CoT-RAFT loss reads the lm_head weight directly and never calls the
lm_head module, so no hook of the lm_head fires. Findings for DeepSpeed 0.19.8 / torch 2.13:

* ``GatheredParameters`` around the loss's forward is NOT enough, even though the fused backward never
  reads the weight. In backward, autograd's AccumulateGrad copies the (V, H) gradient into a tensor
  laid out like the parameter (``clone_obey_contract``); a released ZeRO-3 parameter has shape
  ``(0,)``, so this fails ("size of tensor a (0) must match ... (64)"). It only works by accident
  with tied embeddings, where the embedding module's pre-backward hook has re-gathered the weight.
* ``register_external_parameter(module, p)`` is the supported mechanism: ``module``'s hooks then
  fetch ``p`` before its forward, release it after, fetch it again when the gradient reaches the
  module's outputs (pre-backward) and release it when the gradient has left through its inputs
  (post-backward). AccumulateGrad nodes run first among ready nodes, so the full gradient is
  accumulated while ``p`` is gathered; ZeRO-3's post-accumulate-grad hook
  (``reduce_partition_and_remove_grads``) then reduce-scatters it into each rank's partition and
  drops the full gradient. With tied embeddings autograd sums the embedding's and the loss's
  contributions before that single hook, and ``ds_active_sub_modules`` keeps the shared parameter
  gathered while either module uses it.

So the loss runs inside a small module (:class:`tract_dist.models.cot_raft.CotRaftHead`) that owns no
parameters but registers the lm_head weight/bias as external parameters, and that module must be
part of the model given to DeepSpeed's ``initialize`` (its hooks are installed there). The cost is
ZeRO-3's usual one for an lm_head: one all-gather of the weight in forward and one in backward,
each held only while the loss runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def is_zero3_param(param: torch.Tensor | None) -> bool:
    """True for a parameter managed by ZeRO-3 (partitioned or currently gathered)."""
    return param is not None and hasattr(param, "ds_id") and hasattr(param, "ds_status")


def register_external_params(module: torch.nn.Module, params: Iterable[torch.nn.Parameter | None]) -> None:
    """Make ``module``'s ZeRO-3 hooks gather ``params`` around its forward and backward.

    Safe to call before DeepSpeed's ``initialize`` (even on a model that DeepSpeed converts to ZeRO-3 there:
    registration is by Parameter identity) and a no-op where DeepSpeed is not installed (no ZeRO-3 can partition
    the model there; e.g. a GPU machine running plain PyTorch). The DeepSpeed call itself is the strategy's
    (:func:`tract_dist.train.strategy.register_external_params`), the one module that imports DeepSpeed.
    """
    from tract_dist.train.strategy import register_external_params as register

    register(module, params)


def external_param_ids(module: torch.nn.Module) -> set[int]:
    """Ids of the parameters registered as external to ``module`` (empty if none)."""
    return set(getattr(module, "_external_params", {}).keys())
