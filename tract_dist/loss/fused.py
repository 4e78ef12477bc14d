"""Fused, chunked CoT-RAFT loss: never materialises the (tokens x vocab) logits.

Forward computes the loss *and* the gradients (as Liger-Kernel's fused linear cross entropy does);
backward only scales the stored gradients by grad_output. Work is done on active rows only (CE targets
or score rows), in token chunks x vocab shards:

  pass 1 (per chunk, over shards): logits tile -> online (max, sum-exp) merge; pick the target logit and
         the score-token logits out of the tiles; combine across vocab-parallel ranks.
  pass 2 (per chunk, over shards): logits tile (kept from pass 1 if the local vocab is one shard, else
         recomputed) -> dlogits (tile_ops / Triton) -> grad_hidden += dl @ W, grad_W += dl^T h (fp32).

Gradient w.r.t. the logits z of an active row i (p = softmax(z), c_i = [CE row] / D_ce,
g_i = 2 lam (yhat_i - y_i) / D_mse for score rows, 0 otherwise):
  dL/dz_j = c_i (p_j - [j == t_i]) + g_i dyhat/dz_j
  full softmax:   dyhat/dz_j = p_j (v(j) - yhat),   v(j) = v_k if j == t_k else 0
  rail_normalize: dyhat/dz_j = q_k (v_k - yhat) if j == t_k else 0,   q = softmax(z_{t_1..t_K})
so dl = a_i * p_j - b_i [j == t_i] + sum_k e_ik [j == t_k] with a_i = c_i - (g_i yhat_i unless rail),
b_i = c_i, e_ik = g_i v_k p_ik (full) or g_i q_ik (v_k - yhat_i) (rail).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._common import IGNORE_INDEX, compute_dtype, effective_targets, resolve_denominator
from .tile_ops import tile_grad_, tile_stats
from .vocab_parallel import all_reduce_sum_, combine_row_stats, shard_layout, world_size

#: Default logits-tile budget (elements): 64 MiB in bf16, 128 MiB in fp32.
TILE_ELEMENTS = 1 << 25
#: A local vocabulary up to this size is one shard (single pass, no logits recompute).
MAX_SINGLE_SHARD = 1 << 17


def default_tiles(v_local_max: int, chunk_size: int | None, vocab_shard: int | None) -> tuple[int, int]:
    """(chunk_size, vocab_shard): one vocab shard when it fits, chunk sized to the tile budget.

    The chunk depends only on the largest shard, so all vocab-parallel ranks agree on the number of
    chunks (and so on the number of collectives).
    """
    shard = vocab_shard or (max(v_local_max, 1) if v_local_max <= MAX_SINGLE_SHARD else 1 << 16)
    if chunk_size is None:
        budget = max(TILE_ELEMENTS // min(shard, max(v_local_max, 1)), 16)
        chunk_size = min(1 << (budget.bit_length() - 1), 8192)
    if chunk_size < 1 or shard < 1:
        raise ValueError("chunk_size and vocab_shard must be positive")
    return chunk_size, shard


@dataclass
class FusedInputs:
    """Non-differentiable inputs and options of one call (kept out of autograd's argument list)."""

    targets: torch.Tensor
    score_rows: torch.Tensor
    score_targets: torch.Tensor
    score_token_ids: torch.Tensor
    score_values: torch.Tensor
    lam: float
    rail_normalize: bool
    ce_on_score_token: bool
    ce_denominator: float | int | torch.Tensor | None
    mse_denominator: float | int | torch.Tensor | None
    chunk_size: int | None
    vocab_shard: int | None
    process_group: dist.ProcessGroup | None
    vocab_start: int | None


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
class _Rows:
    """Active rows (CE target or score row) and their targets in this rank's local vocab coordinates."""

    active: torch.Tensor  # (A,) row indices into hidden
    ce: torch.Tensor  # (A,) bool: row has a CE target
    tgt_local: torch.Tensor  # (A,) target - vocab_start if this rank owns it and the row is CE, else -1
    score_of: torch.Tensor  # (A,) index into score_rows, -1 for non-score rows
    score_local: torch.Tensor  # (K,) score token id - vocab_start if owned, else -1
    n_ce: int


def _plan_rows(n_rows: int, inp: FusedInputs, values: torch.Tensor, y: torch.Tensor, v_start: int, v_loc: int,
               v_glob: int, dev: torch.device) -> _Rows:
    score_rows = inp.score_rows.to(dev, torch.long)
    ids = inp.score_token_ids.to(dev, torch.long)
    tgt = effective_targets(inp.targets.to(dev), score_rows, y, ids, values, inp.ce_on_score_token).long()
    ce_mask = tgt != IGNORE_INDEX
    if bool((ce_mask & ((tgt < 0) | (tgt >= v_glob))).any()) or bool(((ids < 0) | (ids >= v_glob)).any()):
        raise ValueError(f"target or score token id outside the vocabulary [0, {v_glob})")
    active_mask = ce_mask.clone()
    active_mask[score_rows] = True
    active = torch.nonzero(active_mask).squeeze(1)
    pos = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
    pos[active] = torch.arange(active.numel(), device=dev)
    score_of = torch.full((active.numel(),), -1, dtype=torch.long, device=dev)
    score_of[pos[score_rows]] = torch.arange(score_rows.numel(), device=dev)
    tgt_act, ce_act = tgt[active], ce_mask[active]
    own_t = ce_act & (tgt_act >= v_start) & (tgt_act < v_start + v_loc)
    own_s = (ids >= v_start) & (ids < v_start + v_loc)
    return _Rows(
        active=active,
        ce=ce_act,
        tgt_local=torch.where(own_t, tgt_act - v_start, -1),
        score_of=score_of,
        score_local=torch.where(own_s, ids - v_start, -1),
        n_ce=int(ce_mask.sum()),
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
    sr: torch.Tensor,
    cdt: torch.dtype,
    keep_tile: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pass 1 over the local shards: (row max, row sum-exp, target logit, score logits, kept tile)."""
    n, dev = hc.shape[0], hc.device
    m = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
    s = torch.zeros((n,), dtype=cdt, device=dev)
    zt = torch.zeros((n,), dtype=cdt, device=dev)
    zs = torch.zeros((sr.numel(), s_loc.numel()), dtype=cdt, device=dev)
    kept = None
    for v0, v1 in shards:
        tile = _logits_tile(hc, weight, bias, v0, v1)
        mt, st = tile_stats(tile, cdt)
        m_new = torch.maximum(m, mt)
        s = s * torch.exp(m - m_new) + st * torch.exp(mt - m_new)  # online merge
        m = m_new
        t_col = _in_tile(t_loc, v0, v1)
        rows = torch.nonzero(t_col >= 0).squeeze(1)
        zt[rows] = tile[rows, t_col[rows]].to(cdt)
        s_col = _in_tile(s_loc, v0, v1)
        ks = torch.nonzero(s_col >= 0).squeeze(1)
        if ks.numel() and sr.numel():
            zs[:, ks] = tile[sr[:, None], s_col[ks][None, :]].to(cdt)
        kept = tile if keep_tile else None
    return m, s, zt, zs, kept


def _add_grad_weight(gw: torch.Tensor, dl: torch.Tensor, hc: torch.Tensor, rows_per_step: int) -> None:
    """gw (fp32/fp64 accumulator) += dl^T @ hc, in row blocks so a low-precision temp stays small."""
    if gw.dtype == dl.dtype:
        gw.addmm_(dl.T, hc)
        return
    for u0 in range(0, gw.shape[0], rows_per_step):
        u1 = min(u0 + rows_per_step, gw.shape[0])
        gw[u0:u1] += (dl[:, u0:u1].T @ hc).to(gw.dtype)


def fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inp: FusedInputs,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> FusedResult:
    """Loss, detached parts and (optionally) gradients with O(chunk x vocab_shard) extra memory."""
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    dev, dt = hidden.device, hidden.dtype
    cdt = compute_dtype(dt)
    group = inp.process_group
    h_dim, v_loc = hidden.shape[1], weight.shape[0]
    v_start, v_glob, v_max = shard_layout(v_loc, group, dev)
    if inp.vocab_start is not None and inp.vocab_start != v_start:
        raise ValueError(f"vocab_start={inp.vocab_start} disagrees with the shard layout (start {v_start})")
    chunk, shard = default_tiles(v_max, inp.chunk_size, inp.vocab_shard)
    shards = [(v0, min(v0 + shard, v_loc)) for v0 in range(0, v_loc, shard)]

    values = inp.score_values.to(dev, cdt)
    y_all = inp.score_targets.to(dev, cdt)
    n_sc = inp.score_rows.numel()
    rows = _plan_rows(hidden.shape[0], inp, values, y_all, v_start, v_loc, v_glob, dev)
    d_ce = resolve_denominator(inp.ce_denominator, rows.n_ce, "ce_denominator")
    d_mse = resolve_denominator(inp.mse_denominator, n_sc, "mse_denominator")
    n_act = rows.active.numel()
    h_act = hidden.index_select(0, rows.active)  # ignored prompt rows cost no matmuls at all

    need_grad = need_hidden or need_weight or need_bias
    gh_act = torch.zeros((n_act, h_dim), dtype=cdt, device=dev) if need_hidden else None
    gw = torch.zeros((v_loc, h_dim), dtype=cdt, device=dev) if need_weight else None
    gb = torch.zeros((v_loc,), dtype=cdt, device=dev) if need_bias else None
    gw_rows = max(1, (chunk * shard) // max(h_dim, 1))
    ce_sum = torch.zeros((), dtype=cdt, device=dev)
    sq_sum = torch.zeros((), dtype=cdt, device=dev)
    yhat = torch.zeros((n_sc,), dtype=cdt, device=dev)

    for c0 in range(0, n_act, chunk):
        c1 = min(c0 + chunk, n_act)
        hc, t_loc = h_act[c0:c1], rows.tgt_local[c0:c1]
        sr = torch.nonzero(rows.score_of[c0:c1] >= 0).squeeze(1)  # chunk-local score rows
        m_idx = rows.score_of[c0:c1][sr]

        # ---- pass 1: row statistics, combined over the vocab-parallel group
        keep = need_grad and len(shards) == 1
        m, s, zt, zs, kept = _chunk_stats(hc, weight, bias, shards, t_loc, rows.score_local, sr, cdt, keep)
        m, s, zt, zs = combine_row_stats(m, s, zt, zs, group)
        lse = m + torch.log(s)
        ce_c = rows.ce[c0:c1].to(cdt)
        ce_sum += ((lse - zt) * ce_c).sum()
        if sr.numel():
            q = torch.softmax(zs, dim=1) if inp.rail_normalize else torch.exp(zs - lse[sr, None])
            yh = q @ values
            yhat[m_idx] = yh
            err = yh - y_all[m_idx]
            sq_sum += (err * err).sum()
        if not need_grad:
            continue

        # ---- row coefficients of dlogits = a * p - b * onehot(t) + sum_k e_k onehot(t_k)
        a = ce_c / d_ce
        b = a.clone()
        e = torch.zeros((c1 - c0, values.numel()), dtype=cdt, device=dev)
        if sr.numel():
            g = (2.0 * inp.lam / d_mse) * err
            if inp.rail_normalize:
                e[sr] = g[:, None] * q * (values[None, :] - yh[:, None])
            else:
                a[sr] -= g * yh
                e[sr] = g[:, None] * q * values[None, :]

        # ---- pass 2: dlogits per shard; gradients accumulated in fp32 (fp64 for fp64 inputs)
        for v0, v1 in shards:
            tile = kept if kept is not None else _logits_tile(hc, weight, bias, v0, v1)
            kept = None
            dl = tile_grad_(tile, lse, a, _in_tile(t_loc, v0, v1), b, _in_tile(rows.score_local, v0, v1), e)
            if gh_act is not None:
                if dl.dtype == cdt:
                    gh_act[c0:c1].addmm_(dl, weight[v0:v1])
                else:
                    gh_act[c0:c1] += (dl @ weight[v0:v1]).to(cdt)
            if gw is not None:
                _add_grad_weight(gw[v0:v1], dl, hc, gw_rows)
            if gb is not None:
                gb[v0:v1] += dl.sum(dim=0, dtype=cdt)
            del tile, dl

    grad_hidden = None
    if gh_act is not None:
        all_reduce_sum_(gh_act, group)  # partial sums over the vocab shards of the group
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[rows.active] = gh_act.to(dt)
    ce = ce_sum / d_ce
    mse = sq_sum / d_mse
    return FusedResult(
        loss=ce + inp.lam * mse,
        ce=ce,
        mse=mse,
        yhat=yhat,
        n_ce_tokens=rows.n_ce,
        n_score_rows=n_sc,
        grad_hidden=grad_hidden,
        grad_weight=None if gw is None else gw.to(weight.dtype),
        grad_bias=None if gb is None else gb.to(bias.dtype),  # type: ignore[union-attr]
    )


class FusedCoTRaftFunction(torch.autograd.Function):
    """Autograd wrapper: gradients come from the forward; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inp: FusedInputs):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        res = fused_forward(hidden, weight, bias, inp, need_h, need_w, need_b)
        ctx.save_for_backward(res.grad_hidden, res.grad_weight, res.grad_bias)
        ctx.mark_non_differentiable(res.ce, res.mse, res.yhat)
        return res.loss, res.ce, res.mse, res.yhat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        grads = []
        for g in ctx.saved_tensors:
            if g is None:
                grads.append(None)
            elif torch.equal(grad_loss, torch.ones_like(grad_loss)):
                grads.append(g)
            else:
                grads.append((g * grad_loss).to(g.dtype))
        return grads[0], grads[1], grads[2], None
