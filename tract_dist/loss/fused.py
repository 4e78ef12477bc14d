"""Fused, chunked CoT-RAFT loss: never materialises the (tokens x vocab) logits.

Forward computes the loss *and* the gradients (as Liger-Kernel's fused linear cross entropy does);
backward only scales the stored gradients by grad_output. Work is done on active rows only (CE targets
or score rows), in token chunks x vocab shards sized from a per-device memory budget (``tiling``):

  plan (once per call): active rows, per-row targets in local vocab coordinates, every input check and
         count, read to the host together; nothing inside the chunk loop waits for the device.
  pass 1 (per chunk, over shards): logits tile -> online (max, sum-exp) merge; gather the target logit
         and the score-token logits (masked gathers, no row selection); combine across vocab-parallel ranks.
  pass 2 (per chunk, over shards): logits tile (kept from pass 1 if the local vocab is one shard, else
         recomputed) -> dlogits in place (tile_ops / Triton) -> grad_hidden rows = dl @ W and
         grad_W (+)= dl^T h. One chunk: grad_W is written once in the weight's dtype. Several chunks:
         it is accumulated in fp32 by matmuls that write fp32 directly on CUDA (``accumulate``).

Gradient w.r.t. the logits z of an active row i (p = softmax(z), c_i = [CE row] / D_ce,
g_i = 2 lam (yhat_i - y_i) / D_mse for score rows, 0 otherwise):
  dL/dz_j = c_i (p_j - [j == t_i]) + g_i dyhat/dz_j
  full softmax:   dyhat/dz_j = p_j (v(j) - yhat),   v(j) = v_k if j == t_k else 0
  rail_normalize: dyhat/dz_j = q_k (v_k - yhat) if j == t_k else 0,   q = softmax(z_{t_1..t_K})
so dl = a_i * p_j - b_i [j == t_i] + sum_k e_ik [j == t_k] with a_i = c_i - (g_i yhat_i unless rail),
b_i = c_i, e_ik = g_i v_k p_ik (full) or g_i q_ik (v_k - yhat_i) (rail). Rows that are not score rows
have g_i = 0, so every row can be treated alike (no data-dependent branches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._common import IGNORE_INDEX, compute_dtype, effective_targets, resolve_denominator
from .accumulate import matmul_into
from .options import CoTRaftLossOptions
from .tile_ops import tile_grad_, tile_stats
from .tiling import chunk_rows, default_tile_bytes, vocab_shard_size
from .vocab_parallel import all_reduce_sum_, combine_row_stats, shard_layout

Denominator = float | int | torch.Tensor | None


@dataclass
class FusedCounts:
    """Host-side counts of one call, filled by the forward (an out-parameter: autograd outputs are tensors)."""

    n_ce_tokens: int = 0
    n_score_rows: int = 0


@dataclass
class FusedResult:
    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    yhat: torch.Tensor
    n_ce_tokens: int
    n_score_rows: int
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


@dataclass
class RowPlan:
    """Active rows (CE target or score row) of one call and what each needs, all on the device."""

    active: torch.Tensor  # (A,) row indices into hidden
    ce: torch.Tensor  # (A,) compute dtype: 1 where the row has a CE target
    tgt_local: torch.Tensor  # (A,) target - vocab_start if this rank owns it and the row is CE, else -1
    is_score: torch.Tensor  # (A,) compute dtype: 1 at score rows
    y_row: torch.Tensor  # (A,) gold score at score rows, 0 elsewhere
    score_pos: torch.Tensor  # (M,) position of each score row among the active rows
    score_local: torch.Tensor  # (K,) score token id - vocab_start if owned, else -1
    n_ce: int


def _has_duplicates(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=x.device)
    s = torch.sort(x).values
    return (s[1:] == s[:-1]).any()


def plan_rows(
    n_rows: int,
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    ce_on_score_token: bool,
    v_start: int,
    v_loc: int,
    v_glob: int,
    cdt: torch.dtype,
) -> RowPlan:
    """Select the active rows; two host synchronisations per call (the checks/counts, the row count)."""
    dev = ids.device
    score_rows = score_rows.to(dev, torch.long)
    y = score_targets.to(dev, cdt)
    tgt = effective_targets(targets.to(dev), score_rows, y, ids, values, ce_on_score_token).long()
    ce_mask = tgt != IGNORE_INDEX
    checks = torch.stack([
        (ce_mask & ((tgt < 0) | (tgt >= v_glob))).any(),
        ((ids < 0) | (ids >= v_glob)).any(),
        ((score_rows < 0) | (score_rows >= n_rows)).any() if score_rows.numel() else ce_mask.new_zeros(()),
        _has_duplicates(score_rows),
        _has_duplicates(ids),
    ]).long()
    bad_target, bad_id, bad_row, dup_rows, dup_ids, n_ce = torch.cat([checks, ce_mask.sum()[None]]).tolist()
    if bad_target or bad_id:
        raise ValueError(f"target or score token id outside the vocabulary [0, {v_glob})")
    if bad_row:
        raise ValueError(f"score_rows must index rows in [0, {n_rows})")
    if dup_rows:
        raise ValueError("score_rows must be unique")
    if dup_ids:
        raise ValueError("score_token_ids must be unique")
    active_mask = ce_mask.clone()
    active_mask[score_rows] = True
    active = torch.nonzero(active_mask).squeeze(1)
    pos = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
    pos[active] = torch.arange(active.numel(), device=dev)
    score_pos = pos[score_rows]
    is_score = torch.zeros(active.numel(), dtype=cdt, device=dev)
    is_score[score_pos] = 1
    y_row = torch.zeros(active.numel(), dtype=cdt, device=dev)
    y_row[score_pos] = y
    tgt_act, ce_act = tgt[active], ce_mask[active]
    own_t = ce_act & (tgt_act >= v_start) & (tgt_act < v_start + v_loc)
    own_s = (ids >= v_start) & (ids < v_start + v_loc)
    return RowPlan(
        active=active,
        ce=ce_act.to(cdt),
        tgt_local=torch.where(own_t, tgt_act - v_start, -1),
        is_score=is_score,
        y_row=y_row,
        score_pos=score_pos,
        score_local=torch.where(own_s, ids - v_start, -1),
        n_ce=int(n_ce),
    )


def _logits_tile(hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor:
    w = weight[v0:v1]
    if bias is None:
        return hc @ w.T
    return torch.addmm(bias[v0:v1].to(hc.dtype), hc, w.T)


def _in_tile(local: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """Tile-local column of each local id, -1 outside [v0, v1)."""
    return torch.where((local >= v0) & (local < v1), local - v0, -1)


def _chunk_stats(
    hc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    shards: list[tuple[int, int]],
    t_loc: torch.Tensor,
    s_loc: torch.Tensor,
    cdt: torch.dtype,
    keep_tile: bool,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pass 1 over the local shards: (row max, row sum-exp, target logit, score logits of every row, tile)."""
    n, dev = hc.shape[0], hc.device
    m = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
    s = torch.zeros((n,), dtype=cdt, device=dev)
    zt = torch.zeros((n,), dtype=cdt, device=dev)
    zs = torch.zeros((n, s_loc.numel()), dtype=cdt, device=dev)
    kept = None
    for v0, v1 in shards:
        tile = _logits_tile(hc, weight, bias, v0, v1)
        mt, st = tile_stats(tile, cdt, kernel)
        if len(shards) == 1:
            m, s = mt, st
        else:
            m_new = torch.maximum(m, mt)
            s = s * torch.exp(m - m_new) + st * torch.exp(mt - m_new)  # online merge
            m = m_new
        t_col = _in_tile(t_loc, v0, v1)
        picked = tile.gather(1, t_col.clamp_min(0)[:, None]).squeeze(1).to(cdt)
        zt += torch.where(t_col >= 0, picked, 0.0)
        if s_loc.numel():
            s_col = _in_tile(s_loc, v0, v1)
            zs += torch.where(s_col[None, :] >= 0, tile.index_select(1, s_col.clamp_min(0)).to(cdt), 0.0)
        kept = tile if keep_tile else None
    return m, s, zt, zs, kept


def fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    score_rows: torch.Tensor,
    score_targets: torch.Tensor,
    opt: CoTRaftLossOptions,
    ce_denominator: Denominator,
    mse_denominator: Denominator,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> FusedResult:
    """Loss, detached parts and (optionally) gradients with O(chunk x vocab_shard) extra memory."""
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    dev, dt = hidden.device, hidden.dtype
    cdt = compute_dtype(dt)
    group = opt.process_group
    h_dim, v_loc = hidden.shape[1], weight.shape[0]
    v_start, v_glob, v_max = shard_layout(v_loc, group, dev)
    if opt.vocab_start is not None and opt.vocab_start != v_start:
        raise ValueError(f"vocab_start={opt.vocab_start} disagrees with the shard layout (start {v_start})")
    ids, values = opt.score_tensors(dev, cdt)
    n_sc = score_rows.numel()
    plan = plan_rows(hidden.shape[0], targets, score_rows, score_targets, ids, values, opt.ce_on_score_token,
                     v_start, v_loc, v_glob, cdt)
    d_ce = resolve_denominator(ce_denominator, plan.n_ce, "ce_denominator")
    d_mse = resolve_denominator(mse_denominator, n_sc, "mse_denominator")
    n_act = plan.active.numel()
    shard = vocab_shard_size(v_max, opt.vocab_shard)
    tile_bytes = opt.tile_bytes or default_tile_bytes(dev)
    chunk = chunk_rows(n_act, min(shard, max(v_max, 1)), hidden.element_size(), tile_bytes, opt.chunk_size)
    shards = [(v0, min(v0 + shard, v_loc)) for v0 in range(0, v_loc, shard)]
    single_chunk = n_act <= chunk
    h_act = hidden.index_select(0, plan.active)  # ignored prompt rows cost no matmuls at all

    need_grad = need_hidden or need_weight or need_bias
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # Partial grad_hidden sums over several shards or ranks are kept in fp32; one shard writes rows directly.
    gh_acc = None
    if need_hidden and (len(shards) > 1 or group is not None):
        gh_acc = torch.zeros((n_act, h_dim), dtype=cdt, device=dev)
    gw = None
    if need_weight:  # one chunk: the final gradient in the weight's dtype; several: an fp32 accumulator
        alloc = torch.empty if n_act else torch.zeros  # the first chunk writes every row (no fill pass)
        gw = alloc((v_loc, h_dim), dtype=dt if single_chunk else cdt, device=dev)
    gb = torch.zeros((v_loc,), dtype=cdt, device=dev) if need_bias else None
    ce_sum = torch.zeros((), dtype=cdt, device=dev)
    sq_sum = torch.zeros((), dtype=cdt, device=dev)
    yhat_act = torch.zeros((n_act,), dtype=cdt, device=dev)
    coef = 2.0 * opt.lam / d_mse

    for c0 in range(0, n_act, chunk):
        c1 = min(c0 + chunk, n_act)
        hc, t_loc = h_act[c0:c1], plan.tgt_local[c0:c1]

        # ---- pass 1: row statistics, combined over the vocab-parallel group
        keep = need_grad and len(shards) == 1
        m, s, zt, zs, kept = _chunk_stats(hc, weight, bias, shards, t_loc, plan.score_local, cdt, keep, opt.kernel)
        m, s, zt, zs = combine_row_stats(m, s, zt, zs, group)
        lse = m + torch.log(s)
        ce_c = plan.ce[c0:c1]
        ce_sum += ((lse - zt) * ce_c).sum()
        a = ce_c / d_ce
        e = zs.new_zeros(zs.shape)
        if n_sc:  # score read-out for every row of the chunk; only score rows carry weight
            q = torch.softmax(zs, dim=1) if opt.rail_normalize else torch.exp(zs - lse[:, None])
            yh = q @ values
            yhat_act[c0:c1] = yh
            err = (yh - plan.y_row[c0:c1]) * plan.is_score[c0:c1]
            sq_sum += (err * err).sum()
            g = coef * err
            if opt.rail_normalize:
                e = g[:, None] * q * (values[None, :] - yh[:, None])
            else:
                e = g[:, None] * q * values[None, :]
                a = a - g * yh
        if not need_grad:
            continue
        b = ce_c / d_ce

        # ---- pass 2: dlogits per shard (in place), then the gradient matmuls
        for si, (v0, v1) in enumerate(shards):
            tile = kept if kept is not None else _logits_tile(hc, weight, bias, v0, v1)
            kept = None
            dl = tile_grad_(tile, lse, a, _in_tile(t_loc, v0, v1), b, _in_tile(plan.score_local, v0, v1), e,
                            opt.kernel)
            if grad_hidden is not None:
                if gh_acc is None:
                    grad_hidden.index_copy_(0, plan.active[c0:c1], dl @ weight[v0:v1])
                else:
                    matmul_into(gh_acc[c0:c1], dl, weight[v0:v1], accumulate=si > 0)
            if gw is not None:
                matmul_into(gw[v0:v1], dl.T, hc, accumulate=c0 > 0)
            if gb is not None:
                gb[v0:v1] += dl.sum(dim=0, dtype=cdt)
            del tile, dl

    if gh_acc is not None and grad_hidden is not None:
        all_reduce_sum_(gh_acc, group)  # partial sums over the vocab shards of the group
        grad_hidden.index_copy_(0, plan.active, gh_acc.to(dt))
    if gw is not None and gw.dtype != dt:
        gw = gw.to(dt)
    ce = ce_sum / d_ce
    mse = sq_sum / d_mse
    return FusedResult(
        loss=ce + opt.lam * mse,
        ce=ce,
        mse=mse,
        yhat=yhat_act[plan.score_pos],
        n_ce_tokens=plan.n_ce,
        n_score_rows=n_sc,
        grad_hidden=grad_hidden,
        grad_weight=gw,
        grad_bias=None if gb is None else gb.to(bias.dtype),  # type: ignore[union-attr]
    )


class FusedCoTRaftFunction(torch.autograd.Function):
    """Autograd wrapper: gradients come from the forward; backward scales them by grad_output (in place).

    Non-tensor inputs: the options object (one argument, as Cut Cross-Entropy does), the two
    denominators and a :class:`FusedCounts` that receives the host-side counts.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, score_rows, score_targets,  # type: ignore[override]
                options: CoTRaftLossOptions, ce_denominator: Denominator, mse_denominator: Denominator,
                counts: FusedCounts | None = None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        res = fused_forward(hidden, weight, bias, targets, score_rows, score_targets, options,
                            ce_denominator, mse_denominator, need_h, need_w, need_b)
        if counts is not None:
            counts.n_ce_tokens, counts.n_score_rows = res.n_ce_tokens, res.n_score_rows
        ctx.save_for_backward(res.grad_hidden, res.grad_weight, res.grad_bias)
        ctx.applied = None
        ctx.mark_non_differentiable(res.ce, res.mse, res.yhat)
        return res.loss, res.ce, res.mse, res.yhat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        saved = ctx.saved_tensors
        if ctx.applied is None:
            # First backward: scale in place and unconditionally. Comparing grad_loss with 1 would be a host
            # synchronisation; a scaled copy would cost another weight-sized buffer at the peak. Through
            # ``.data`` so that a retained graph can unpack the saved tensors again (see below).
            for g in saved:
                if g is not None:
                    g.data.mul_(grad_loss)
            grads = list(saved)
            ctx.applied = grad_loss.detach().clone()
        else:  # retain_graph / gradcheck: the saved gradients already carry the first scale
            if not bool(ctx.applied != 0):
                raise RuntimeError("a second backward through the fused CoT-RAFT loss after one with a zero "
                                   "grad_output cannot be recovered; use impl='reference'")
            ratio = grad_loss / ctx.applied
            grads = [None if g is None else g * ratio.to(g.dtype) for g in saved]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None
