"""Fused, chunked CoT-RAFT loss: never materialises the (tokens x vocab) logits.

Forward computes the loss *and* the gradients (as Liger-Kernel's fused linear cross entropy does);
backward only scales the stored gradients by grad_output. Work is done on active rows only (CE targets
or score rows), in token chunks x vocab shards sized from a per-device memory budget (``tiling``):

  plan (once per call): active rows, per-row targets in local vocab coordinates, every input check and
         count, read to the host together; nothing inside the chunk loop waits for the device.
  one pass (PyTorch kernels, whole local vocabulary in one shard, no vocab-parallel group; the CPU path):
         logits tile -> per 16 MiB row block one fused log_softmax -> loss terms and coefficients -> dlogits
         written over the tile -> gradient matmuls.
  two passes (Triton kernels on CUDA, or several shards / ranks):
    pass 1 (over shards): logits tile -> online (max, sum-exp) merge; gather the target logit and the
         score-token logits (masked gathers, no row selection); combine across vocab-parallel ranks.
    pass 2 (over shards): logits tile (kept from pass 1 if the local vocab is one shard, else
         recomputed) -> dlogits in place (tile_ops / Triton) -> gradient matmuls.
  gradient matmuls: grad_hidden rows = dl @ W; grad_W (+)= dl^T h. One chunk: grad_W is written once in
         the weight's dtype. Several chunks: it is accumulated in fp32 by matmuls that write fp32 directly
         on CUDA (``accumulate``).

Gradient w.r.t. the logits z of an active row i (p = softmax(z), c_i = w_i [CE row] / D_ce,
g_i = 2 lam u_i (yhat_i - y_i) / D_mse for score rows, 0 otherwise; w_i / u_i are the row's CE / squared-error
weights, 1 unless ``ce_weights`` / ``mse_weights`` are given, and enter only these two coefficients):
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

from ._common import (IGNORE_INDEX, CoTRaftLossOutput, compute_dtype, effective_targets, effective_targets_multi,
                      resolve_denominator, value_logprobs)
from .accumulate import matmul_into
from .options import CoTRaftLossOptions
from .tile_ops import tile_grad_, tile_stats, use_triton
from .tiling import block_rows, chunk_rows, default_tile_bytes, vocab_shard_size
from .vocab_parallel import all_reduce_sum_, combine_row_stats, shard_layout

Denominator = float | int | torch.Tensor | None


@dataclass
class FusedCounts:
    """Host-side counts of one call, filled by the forward (an out-parameter: autograd outputs are tensors)."""

    n_ce_tokens: int = 0
    n_score_rows: int = 0


@dataclass
class FusedResult(CoTRaftLossOutput):
    """The loss parts and, computed in the same pass, the gradients backward scales by grad_output."""

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
    w_score: torch.Tensor | None  # (A,) weight of the squared error at score rows (0 elsewhere); None: all 1
    score_pos: torch.Tensor  # (M,) position of each score row among the active rows
    score_local: torch.Tensor  # (K,) score token id - vocab_start if owned, else -1
    n_ce: int
    node_pos: torch.Tensor | None = None  # (M, N) position of each trie node's row among the active rows


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
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    nodes: torch.Tensor | None = None,
    trie: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> RowPlan:
    """Select the active rows; two host synchronisations per call (the checks/counts, the row count). The
    weights' finiteness is one more entry of the first read, so they cost no extra synchronisation.
    ``nodes`` (M, N) / ``trie``: a multi-token scale, every trie node's row is active (and unique)."""
    dev = ids.device
    score_rows = score_rows.to(dev, torch.long)
    y = score_targets.to(dev, cdt)
    if nodes is None or trie is None:
        tgt = effective_targets(targets.to(dev), score_rows, y, ids, values, ce_on_score_token).long()
        read_rows = score_rows
    else:
        nodes = nodes.to(dev, torch.long)
        tgt = effective_targets_multi(targets.to(dev), nodes, y, ids, values, trie[1], trie[2],
                                      ce_on_score_token).long()
        read_rows = nodes.flatten()
    ce_mask = tgt != IGNORE_INDEX
    checks = torch.stack([
        (ce_mask & ((tgt < 0) | (tgt >= v_glob))).any(),
        ((ids < 0) | (ids >= v_glob)).any(),
        ((read_rows < 0) | (read_rows >= n_rows)).any() if read_rows.numel() else ce_mask.new_zeros(()),
        _has_duplicates(read_rows),
        _has_duplicates(ids),
        _any_nonfinite(ce_weights, dev) | _any_nonfinite(mse_weights, dev),
    ]).long()
    bad_target, bad_id, bad_row, dup_rows, dup_ids, bad_w, n_ce = torch.cat([checks, ce_mask.sum()[None]]).tolist()
    if bad_target or bad_id:
        raise ValueError(f"target or score token id outside the vocabulary [0, {v_glob})")
    if bad_row:
        raise ValueError(f"score_rows must index rows in [0, {n_rows})")
    if dup_rows:
        raise ValueError("score_rows must be unique")
    if dup_ids:
        raise ValueError("score_token_ids must be unique")
    if bad_w:
        raise ValueError("sequence weights must be finite")
    active_mask = ce_mask.clone()
    active_mask[read_rows] = True
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
    ce_coef = ce_act.to(cdt)
    if ce_weights is not None:  # the row's CE weight rides on its 0/1 CE mask (x 1.0 is exact)
        ce_coef = ce_coef * ce_weights.to(dev, cdt)[active]
    w_score = None
    if mse_weights is not None:
        w_score = torch.zeros(active.numel(), dtype=cdt, device=dev)
        w_score[score_pos] = mse_weights.to(dev, cdt)
    return RowPlan(
        active=active,
        ce=ce_coef,
        tgt_local=torch.where(own_t, tgt_act - v_start, -1),
        is_score=is_score,
        y_row=y_row,
        w_score=w_score,
        score_pos=score_pos,
        score_local=torch.where(own_s, ids - v_start, -1),
        n_ce=int(n_ce),
        node_pos=None if nodes is None else pos[nodes],
    )


def _any_nonfinite(w: torch.Tensor | None, dev: torch.device) -> torch.Tensor:
    if w is None or w.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=dev)
    return (~torch.isfinite(w.to(dev))).any()


def _logits_tile(hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """h_chunk @ W[v0:v1]^T (+ b), into ``out`` when given (a buffer reused across chunks: on CPU a fresh
    tile-sized allocation costs its page faults every time)."""
    w = weight[v0:v1]
    if bias is None:
        return torch.mm(hc, w.T, out=out) if out is not None else hc @ w.T
    b = bias[v0:v1].to(hc.dtype)
    return torch.addmm(b, hc, w.T, out=out) if out is not None else torch.addmm(b, hc, w.T)


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


def _gradient_matmuls(dl: torch.Tensor, hc: torch.Tensor, weight: torch.Tensor, v0: int, v1: int,
                      rows: torch.Tensor, grad_hidden: torch.Tensor | None, gh_acc: torch.Tensor | None,
                      gw: torch.Tensor | None, gb: torch.Tensor | None, *, first_shard: bool, first_chunk: bool,
                      cdt: torch.dtype) -> None:
    """grad_hidden rows (+)= dl @ W_shard, grad_W[shard] (+)= dl^T @ h_chunk, grad_b[shard] += sum(dl)."""
    if grad_hidden is not None:
        if gh_acc is None:  # one shard, no group: the chunk's rows are final
            grad_hidden.index_copy_(0, rows, dl @ weight[v0:v1])
        else:
            matmul_into(gh_acc, dl, weight[v0:v1], accumulate=not first_shard)
    if gw is not None:
        matmul_into(gw[v0:v1], dl.T, hc, accumulate=not first_chunk)
    if gb is not None:
        gb[v0:v1] += dl.sum(dim=0, dtype=cdt)


@dataclass
class _Objective:
    """Per-call constants of the row coefficients."""

    values: torch.Tensor  # (K,) score values
    d_ce: float
    coef: float  # 2 lam / D_mse
    rail: bool
    has_scores: bool
    multi: bool = False  # multi-token scale: the score coefficients come from the trie pre-pass (_TrieTerms)


@dataclass
class _RowTerms:
    nll_sum: torch.Tensor  # sum over CE rows of -log p(target)
    sq_sum: torch.Tensor  # sum over score rows of (yhat - y)^2
    yhat: torch.Tensor  # (R,) read-out of every row (meaningful at score rows)
    a: torch.Tensor  # (R,) coefficients of dl = a * p - b * onehot(t) + sum_k e_k onehot(t_k)
    b: torch.Tensor
    e: torch.Tensor  # (R, K)


@dataclass
class _TrieTerms:
    """A multi-token scale's regression part, computed before the chunk loop from every trie node's row (a
    score's nodes may fall in different chunks, and each node's coefficients need all of them)."""

    sq_sum: torch.Tensor  # sum over scores of u (yhat - y)^2
    yhat: torch.Tensor  # (M,)
    a_shift: torch.Tensor  # (A,) g * S_n at node rows, 0 elsewhere: subtracted from a
    e: torch.Tensor  # (A, K_u) g * S_{n,j} at node rows, 0 elsewhere


def _trie_terms(lp_nodes: torch.Tensor, y: torch.Tensor, u: torch.Tensor | None, node_pos: torch.Tensor,
                n_act: int, incidence: torch.Tensor, obj: _Objective) -> _TrieTerms:
    """log p(v) = Σ_edges log p(edge | node) along v's path, ŷ = Σ v p(v) (or the renormalised q), and
    ∂ŷ/∂z_{n,j} = S_{n,j} - S_n p_n(j) with S_{n,j} = Σ_{v through edge (n, j)} w_v, S_n = Σ_j S_{n,j},
    w_v = v p(v) (full softmax) or (v - ŷ) q(v) (rail_normalize). So a node row's dlogits are
    a p - b onehot(t) + Σ_j e_j onehot(t_j) with a = c - g S_n and e_j = g S_{n,j}: the single-token form."""
    m, n, k_u = lp_nodes.shape
    logpv = value_logprobs(lp_nodes, incidence)
    q = torch.softmax(logpv, dim=1) if obj.rail else logpv.exp()
    yh = q @ obj.values
    err = yh - y
    werr = err if u is None else err * u
    g = obj.coef * werr
    w = q * (obj.values[None, :] - yh[:, None]) if obj.rail else q * obj.values[None, :]
    s_edge = (w @ incidence).view(m, n, k_u) * g[:, None, None]
    a_shift = torch.zeros(n_act, dtype=lp_nodes.dtype, device=lp_nodes.device)
    e = torch.zeros((n_act, k_u), dtype=lp_nodes.dtype, device=lp_nodes.device)
    flat = node_pos.flatten()
    a_shift[flat] = s_edge.sum(dim=2).flatten()
    e[flat] = s_edge.reshape(m * n, k_u)
    return _TrieTerms((werr * err).sum(), yh, a_shift, e)


def _row_terms(lp_t: torch.Tensor, lp_s: torch.Tensor, ce: torch.Tensor, is_score: torch.Tensor,
               y_row: torch.Tensor, obj: _Objective, w_score: torch.Tensor | None = None,
               pre: tuple[torch.Tensor, torch.Tensor] | None = None) -> _RowTerms:
    """Loss parts and gradient coefficients of a block of rows from their log-probabilities: ``lp_t`` of
    the target (any value where ``ce`` is 0) and ``lp_s`` (R, K) of the score tokens. ``ce`` is the row's
    CE weight (its 0/1 mask times its sequence weight), ``w_score`` the squared error's weight (None: 1).
    Rows that are not score rows get ``g = 0``, so no row needs a data-dependent branch."""
    nll_sum = -(lp_t * ce).sum()
    a = ce / obj.d_ce
    b = a
    if pre is not None:  # multi-token scale: the trie pre-pass has the coefficients (and the squared errors)
        zeros = lp_s.new_zeros(lp_s.shape[0])
        return _RowTerms(nll_sum, zeros.sum(), zeros, a - pre[0], b, pre[1])
    if not obj.has_scores:
        zeros = lp_s.new_zeros(lp_s.shape[0])
        return _RowTerms(nll_sum, zeros.sum(), zeros, a, b, lp_s.new_zeros(lp_s.shape))
    q = torch.softmax(lp_s, dim=1) if obj.rail else torch.exp(lp_s)  # softmax is shift-invariant: of z_s too
    yh = q @ obj.values
    err = (yh - y_row) * is_score
    werr = err if w_score is None else err * w_score
    g = obj.coef * werr
    if obj.rail:
        e = g[:, None] * q * (obj.values[None, :] - yh[:, None])
    else:
        e = g[:, None] * q * obj.values[None, :]
        a = a - g * yh
    return _RowTerms(nll_sum, (werr * err).sum(), yh, a, b, e)


def _one_pass_chunk(tile: torch.Tensor, t_loc: torch.Tensor, s_loc: torch.Tensor, ce: torch.Tensor,
                    is_score: torch.Tensor, y_row: torch.Tensor, obj: _Objective, cdt: torch.dtype,
                    need_grad: bool, w_score: torch.Tensor | None = None,
                    pre: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch path with the whole vocabulary in one tile and no vocab-parallel group: per row block, one
    fused ``log_softmax`` gives the loss terms and, exponentiated in place, the gradient, written back over
    the tile as dlogits. One pass over the tile instead of a statistics pass and a gradient pass, and an
    fp32 work block of ``block_rows`` rows instead of an fp32 copy of the tile. Returns (nll, sq, yhat)."""
    n = tile.shape[0]
    nll = torch.zeros((), dtype=cdt, device=tile.device)
    sq = torch.zeros((), dtype=cdt, device=tile.device)
    yhat = torch.zeros((n,), dtype=cdt, device=tile.device)
    t_idx = t_loc.clamp_min(0)[:, None]  # rows without a CE target have b = 0: any column will do
    s_idx = s_loc.clamp_min(0)
    step = block_rows(n, tile.shape[1], tile.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        lp = torch.log_softmax(tile[r0:r1], dim=1, dtype=cdt)
        terms = _row_terms(lp.gather(1, t_idx[r0:r1]).squeeze(1), lp.index_select(1, s_idx), ce[r0:r1],
                           is_score[r0:r1], y_row[r0:r1], obj, None if w_score is None else w_score[r0:r1],
                           None if pre is None else (pre[0][r0:r1], pre[1][r0:r1]))
        nll += terms.nll_sum
        sq += terms.sq_sum
        yhat[r0:r1] = terms.yhat
        if need_grad:
            lp.exp_().mul_(terms.a[:, None])
            lp.scatter_add_(1, t_idx[r0:r1], -terms.b[:, None])
            if s_idx.numel():
                lp.scatter_add_(1, s_idx[None, :].expand(r1 - r0, -1), terms.e)
            tile[r0:r1].copy_(lp)
    return nll, sq, yhat


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
    ce_weights: torch.Tensor | None = None,
    mse_weights: torch.Tensor | None = None,
    lam: float | None = None,
    score_branch_rows: torch.Tensor | None = None,
) -> FusedResult:
    """Loss, detached parts and (optionally) gradients with O(chunk x vocab_shard) extra memory. ``lam``:
    this call's regression weight (a schedule's), default ``opt.lam``. ``score_branch_rows`` (M, N - 1): the
    rows of a multi-token scale's internal trie nodes (``opt.score_sequences``)."""
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
    multi = opt.score_sequences is not None
    trie = opt.trie_tensors(dev, cdt) if multi else None
    nodes = None
    if multi:
        nodes = score_rows.to(dev, torch.long)[:, None]
        if score_branch_rows is not None and score_branch_rows.numel():
            nodes = torch.cat([nodes, score_branch_rows.to(dev, torch.long)], dim=1)
    plan = plan_rows(hidden.shape[0], targets, score_rows, score_targets, ids, values, opt.ce_on_score_token,
                     v_start, v_loc, v_glob, cdt, ce_weights, mse_weights, nodes, trie)
    lam = opt.lam if lam is None else lam
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

    obj = _Objective(values=values, d_ce=d_ce, coef=2.0 * lam / d_mse, rail=opt.rail_normalize,
                     has_scores=n_sc > 0 and values.numel() > 0, multi=multi)
    pre_terms = None
    if multi and trie is not None and plan.node_pos is not None:
        # Trie pre-pass: the edge log-probabilities at every node row (M x N rows, a few per score), so that
        # each node's coefficients, which depend on all of its score's nodes, are known before the chunk loop.
        # These rows' logits are computed again in the loop (for their dlogits): M x N extra rows of matmul.
        node_flat = plan.active.index_select(0, plan.node_pos.flatten())
        h_nodes = hidden.index_select(0, node_flat)
        no_tgt = torch.full((h_nodes.shape[0],), -1, dtype=torch.long, device=dev)
        lp_parts = []
        for r0 in range(0, h_nodes.shape[0], max(chunk, 1)):
            r1 = min(r0 + max(chunk, 1), h_nodes.shape[0])
            m, s_, zt, zs, _ = _chunk_stats(h_nodes[r0:r1], weight, bias, shards, no_tgt[r0:r1], plan.score_local,
                                            cdt, False, opt.kernel)
            m, s_, zt, zs = combine_row_stats(m, s_, zt, zs, group)
            lp_parts.append(zs - (m + torch.log(s_))[:, None])
        lp_nodes = torch.cat(lp_parts).view(n_sc, -1, ids.numel()) if lp_parts else \
            torch.zeros((0, plan.node_pos.shape[1], ids.numel()), dtype=cdt, device=dev)
        u = None if mse_weights is None else mse_weights.to(dev, cdt)
        pre_terms = _trie_terms(lp_nodes, score_targets.to(dev, cdt), u, plan.node_pos, n_act, trie[0], obj)
        sq_sum += pre_terms.sq_sum
    one_pass = len(shards) == 1 and group is None and not use_triton(h_act, opt.kernel)

    tile_buf = torch.empty((min(chunk, n_act), v_loc), dtype=dt, device=dev) if one_pass and n_act else None

    for c0 in range(0, n_act, chunk):
        c1 = min(c0 + chunk, n_act)
        hc, t_loc = h_act[c0:c1], plan.tgt_local[c0:c1]
        ce_c, sc_c, y_c = plan.ce[c0:c1], plan.is_score[c0:c1], plan.y_row[c0:c1]
        ws_c = None if plan.w_score is None else plan.w_score[c0:c1]
        pre_c = None if pre_terms is None else (pre_terms.a_shift[c0:c1], pre_terms.e[c0:c1])

        if one_pass:
            tile = _logits_tile(hc, weight, bias, 0, v_loc, out=tile_buf[: c1 - c0])
            nll, sq, yh = _one_pass_chunk(tile, t_loc, plan.score_local, ce_c, sc_c, y_c, obj, cdt, need_grad, ws_c,
                                          pre_c)
            ce_sum += nll
            sq_sum += sq
            yhat_act[c0:c1] = yh
            if need_grad:
                _gradient_matmuls(tile, hc, weight, 0, v_loc, plan.active[c0:c1], grad_hidden, None, gw, gb,
                                  first_shard=True, first_chunk=c0 == 0, cdt=cdt)
            del tile
            continue

        # ---- pass 1: row statistics, combined over the vocab-parallel group
        keep = need_grad and len(shards) == 1
        m, s, zt, zs, kept = _chunk_stats(hc, weight, bias, shards, t_loc, plan.score_local, cdt, keep, opt.kernel)
        m, s, zt, zs = combine_row_stats(m, s, zt, zs, group)
        lse = m + torch.log(s)
        terms = _row_terms(zt - lse, zs - lse[:, None], ce_c, sc_c, y_c, obj, ws_c, pre_c)
        ce_sum += terms.nll_sum
        sq_sum += terms.sq_sum
        yhat_act[c0:c1] = terms.yhat
        if not need_grad:
            continue

        # ---- pass 2: dlogits per shard (in place), then the gradient matmuls
        for si, (v0, v1) in enumerate(shards):
            tile = kept if kept is not None else _logits_tile(hc, weight, bias, v0, v1)
            kept = None
            dl = tile_grad_(tile, lse, terms.a, _in_tile(t_loc, v0, v1), terms.b,
                            _in_tile(plan.score_local, v0, v1), terms.e, opt.kernel)
            _gradient_matmuls(dl, hc, weight, v0, v1, plan.active[c0:c1], grad_hidden,
                              None if gh_acc is None else gh_acc[c0:c1], gw, gb,
                              first_shard=si == 0, first_chunk=c0 == 0, cdt=cdt)
            del tile, dl

    if gh_acc is not None and grad_hidden is not None:
        all_reduce_sum_(gh_acc, group)  # partial sums over the vocab shards of the group
        grad_hidden.index_copy_(0, plan.active, gh_acc.to(dt))
    if gw is not None and gw.dtype != dt:
        gw = gw.to(dt)
    ce = ce_sum / d_ce
    mse = sq_sum / d_mse
    return FusedResult(
        loss=ce + lam * mse,
        ce=ce,
        mse=mse,
        yhat=yhat_act[plan.score_pos] if pre_terms is None else pre_terms.yhat,
        n_ce_tokens=plan.n_ce,
        n_score_rows=n_sc,
        grad_hidden=grad_hidden,
        grad_weight=gw,
        grad_bias=None if gb is None else gb.to(bias.dtype),  # type: ignore[union-attr]
    )


class FusedCoTRaftFunction(torch.autograd.Function):
    """Autograd wrapper: gradients come from the forward; backward scales them by grad_output (in place).

    Non-tensor inputs: the options object (one argument, as Cut Cross-Entropy does), the two
    denominators and a :class:`FusedCounts` that receives the host-side counts; then the optional per-row CE
    and per-score-row squared-error weights (constants: no gradient flows to them) and this call's ``lam``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, score_rows, score_targets,  # type: ignore[override]
                options: CoTRaftLossOptions, ce_denominator: Denominator, mse_denominator: Denominator,
                counts: FusedCounts | None = None, ce_weights: torch.Tensor | None = None,
                mse_weights: torch.Tensor | None = None, lam: float | None = None,
                score_branch_rows: torch.Tensor | None = None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        res = fused_forward(hidden, weight, bias, targets, score_rows, score_targets, options,
                            ce_denominator, mse_denominator, need_h, need_w, need_b, ce_weights, mse_weights, lam,
                            score_branch_rows)
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
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None, None, None
