"""Use ZeRO-3 partitioned parameters in a computation that runs outside any module's forward.

DeepSpeed ZeRO-3 gathers a parameter only around the forward/backward of the module that owns it
(module hooks). The fused CoT-RAFT loss reads the lm_head weight directly, never calling the lm_head
module, so no hook fires. Why ``GatheredParameters`` (DeepSpeed 0.19.8) and not
``register_external_parameter``:

* ``register_external_parameter(m, p)`` makes ``m``'s pre-forward hook fetch ``p`` and its pre-backward
  hook fetch it again. Registered on the root module, the full weight would be held through the whole
  decoder forward and re-gathered at the start of backward, which the fused loss does not need (it
  computes the weight gradient during its forward; its backward only rescales).
* ``GatheredParameters([p], modifier_rank=None)`` all-gathers exactly for the loss's forward and frees
  the full copy on exit. The Parameter object is used while full, so autograd's AccumulateGrad node is
  created with the full shape; in backward the full (V, H) gradient lands in ``p.grad`` and fires
  ZeRO-3's post-accumulate-grad hook (``reduce_partition_and_remove_grads``), which reduce-scatters it
  into this rank's partition. With tied embeddings the embedding's and the loss's contributions are
  summed by autograd before that single hook.

Only parameters that are ``NOT_AVAILABLE`` are gathered: one the ZeRO coordinator already holds (a
persistent small parameter, or the tied embedding kept for reuse) is used as is, since releasing it
on exit would corrupt the coordinator's bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch


def is_zero3_param(param: torch.Tensor | None) -> bool:
    """True for a parameter managed by ZeRO-3 (partitioned or currently gathered)."""
    return param is not None and hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _status_name(param: torch.Tensor) -> str:
    return getattr(param.ds_status, "name", str(param.ds_status))


@contextmanager
def gathered_for_loss(
    params: Sequence[torch.nn.Parameter | None], *, keep_for_backward: bool = False
) -> Iterator[list[torch.Tensor | None]]:
    """Yield tensors with the full data of ``params`` that carry gradient back to the parameters.

    For plain (non-ZeRO-3) parameters this is a no-op that yields them unchanged. Under ZeRO-3 the
    partitioned ones are all-gathered for the body of the ``with`` and released afterwards; every
    rank must enter it (it is a collective).

    ``keep_for_backward=True`` is for losses whose backward reads the weight (the logits-materialising
    reference): ZeRO-3 parameters are then yielded as ``param.clone()``, a full copy that autograd keeps
    until backward while the parameter itself is released. Its gradient still flows to the parameter.
    """
    zero = [p for p in params if is_zero3_param(p)]
    if not zero:
        yield list(params)
        return
    to_gather = [p for p in zero if _status_name(p) == "NOT_AVAILABLE"]
    inflight = [p for p in zero if _status_name(p) == "INFLIGHT"]
    if inflight:  # GatheredParameters would skip it and hand out a half-received buffer
        raise RuntimeError(f"ZeRO-3 parameter(s) {[p.ds_id for p in inflight]} are in flight; cannot gather")

    if to_gather:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None)
    else:
        ctx = nullcontext()
    with ctx:
        zero_ids = {id(p) for p in zero}
        yield [p.clone() if keep_for_backward and id(p) in zero_ids else p for p in params]
