"""One options object for the CoT-RAFT loss, built once (from the config) and passed down unchanged.

Everything about the loss that does not change from step to step lives here: the score scale, the
objective's switches and the fused path's tiling. Per-step values (the batch tensors and the global
denominators) are call arguments. Cut Cross-Entropy passes one such object to its autograd function;
so does :class:`tract_dist.loss.fused.FusedCoTRaftFunction`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # the loss package does not import the config at run time
    from tract_dist.config import LossSection

Impl = Literal["fused", "reference"]
Kernel = Literal["auto", "torch", "triton"]


@dataclass(frozen=True, eq=False)
class CoTRaftLossOptions:
    """Settings of the CoT-RAFT loss.

    Attributes:
        score_token_ids: (K,) unique global token ids of the score values (from the tokenizer).
        score_values: (K,) the value of each score token, e.g. 1..5.
        lam: weight of the MSE term (``loss = ce + lam * mse``).
        rail_normalize: renormalise the score distribution over the K score tokens (default: the
            full-vocabulary softmax, as in the paper).
        ce_on_score_token: score rows also get a CE target, the score token nearest to the gold score.
        impl: ``"fused"`` (chunked, never materialises N x V logits) or ``"reference"`` (full logits).
        kernel: per-tile elementwise work of the fused path: ``"triton"`` (CUDA), ``"torch"`` or
            ``"auto"`` (Triton on CUDA; ``TRACT_LOSS_TRITON`` overrides it, see ``tile_ops``).
        chunk_size: active rows per tile; default from the device's tile budget (``tiling``).
        vocab_shard: vocabulary rows per tile; default the whole local vocabulary up to 131072.
        tile_bytes: logits-tile budget in bytes; default per device (``tiling.default_tile_bytes``).
        process_group: vocab-parallel group (this rank holds a contiguous shard of the lm_head).
        vocab_start: this rank's first vocabulary row, checked against the all-gathered layout.
        score_sequences: (K,) token sequences of the score values when a value is several tokens
            (``data.score_scale``: "10" = "1", "0"); then ``score_token_ids`` must be empty (it becomes the
            trie's edge tokens) and the loss reads p(v) as a product over the trie's nodes, whose rows are
            the call's ``score_node_rows``. None: one token per value (``score_token_ids``).
    """

    score_token_ids: Sequence[int] | torch.Tensor
    score_values: Sequence[float] | torch.Tensor
    lam: float = 1.0
    rail_normalize: bool = False
    ce_on_score_token: bool = False
    impl: Impl = "fused"
    kernel: Kernel = "auto"
    chunk_size: int | None = None
    vocab_shard: int | None = None
    tile_bytes: int | None = None
    process_group: dist.ProcessGroup | None = None
    vocab_start: int | None = None
    score_sequences: Sequence[Sequence[int]] | None = None
    _device_cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.score_sequences is not None:
            self._init_sequences()
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {self.impl!r}")
        if self.kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {self.kernel!r}")
        for name in ("chunk_size", "vocab_shard", "tile_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        ids, values = self.score_token_ids, self.score_values
        n_ids = ids.numel() if isinstance(ids, torch.Tensor) else len(ids)
        n_values = values.numel() if isinstance(values, torch.Tensor) else len(values)
        if n_ids != n_values and self.score_sequences is None:
            raise ValueError(f"{n_ids} score token ids but {n_values} score values")
        if not isinstance(ids, torch.Tensor) and len(set(int(i) for i in ids)) != len(ids):
            raise ValueError(f"score_token_ids must be unique, got {list(ids)}")

    def _init_sequences(self) -> None:
        """Multi-token scale: the trie's edge tokens become ``score_token_ids``; K values, K sequences."""
        from tract_dist.data.score_scale import build_trie  # pure Python, no config import

        seqs = tuple(tuple(int(t) for t in s) for s in self.score_sequences)  # type: ignore[union-attr]
        ids = self.score_token_ids
        if (ids.numel() if isinstance(ids, torch.Tensor) else len(ids)) != 0:
            raise ValueError("give score_token_ids or score_sequences, not both")
        n_values = self.score_values.numel() if isinstance(self.score_values, torch.Tensor) else len(self.score_values)
        if len(seqs) != n_values:
            raise ValueError(f"{len(seqs)} score sequences but {n_values} score values")
        if any(not s for s in seqs) or len(set(seqs)) != len(seqs):
            raise ValueError("score sequences must be non-empty and distinct")
        if any(len(o) > len(s) and o[:len(s)] == s for s in seqs for o in seqs):
            raise ValueError("no score sequence may be a proper prefix of another (end it with the terminator)")
        if all(len(s) == 1 for s in seqs):  # one token per value: exactly the single-token loss (same code path)
            object.__setattr__(self, "score_token_ids", tuple(s[0] for s in seqs))
            object.__setattr__(self, "score_sequences", None)
            return
        trie = build_trie(list(seqs))
        object.__setattr__(self, "score_sequences", seqs)
        object.__setattr__(self, "score_token_ids", trie.edge_ids)
        object.__setattr__(self, "_trie", trie)

    @property
    def multi_token(self) -> bool:
        """The scale has a value of several tokens: ŷ needs the trie's internal nodes as well as the root."""
        return self.score_sequences is not None and any(len(s) > 1 for s in self.score_sequences)

    @property
    def num_score_nodes(self) -> int:
        """Rows read per score: 1 (the root) for single-token scales, the trie's node count otherwise."""
        return self._trie.num_nodes if self.score_sequences is not None else 1

    def trie_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
        """(incidence (K, N·K_u) in ``dtype``, path nodes (K, L) long, path edges (K, L) long; -1 pads), built
        once per device like :meth:`score_tensors`."""
        key = ("trie", str(device), dtype)
        hit = self._device_cache.get(key)
        if hit is None:
            trie = self._trie
            inc = torch.tensor(trie.incidence(), dtype=torch.float64)
            depth = max(len(p) for p in trie.paths)
            nodes = torch.full((len(trie.paths), depth), -1, dtype=torch.long)
            edges = torch.full((len(trie.paths), depth), -1, dtype=torch.long)
            for v, path in enumerate(trie.paths):
                for i, (n, j) in enumerate(path):
                    nodes[v, i], edges[v, i] = n, j
            hit = self._device_cache[key] = (inc.to(device=device, dtype=dtype), nodes.to(device), edges.to(device))
        return hit  # type: ignore[return-value]

    @classmethod
    def from_config(
        cls,
        section: LossSection,
        score_token_ids: Sequence[int],
        score_values: Sequence[float],
        **overrides: Any,
    ) -> CoTRaftLossOptions:
        """The options of a ``loss:`` config section and the tokenizer's score tokens."""
        settings = dict(
            lam=section.lam,
            rail_normalize=section.rail_normalize,
            ce_on_score_token=section.ce_on_score_token,
            impl=section.impl,
            kernel=section.kernel,
            chunk_size=section.chunk_size,
            vocab_shard=section.vocab_shard,
            tile_bytes=None if section.tile_mib is None else section.tile_mib << 20,
        )
        settings.update(overrides)
        return cls(tuple(int(i) for i in score_token_ids), tuple(float(v) for v in score_values), **settings)

    @property
    def num_scores(self) -> int:
        if self.score_sequences is not None:
            return len(self.score_sequences)
        ids = self.score_token_ids
        return ids.numel() if isinstance(ids, torch.Tensor) else len(ids)

    def score_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids long, values ``dtype``) on ``device``, built once per device: a host-to-device copy from
        pageable memory waits for the GPU queue, so it must not happen on every micro-step."""
        key = (str(device), dtype)
        hit = self._device_cache.get(key)
        if hit is None:
            ids, values = self.score_token_ids, self.score_values
            if not isinstance(ids, torch.Tensor):
                ids = torch.tensor(list(ids), dtype=torch.long)
            if not isinstance(values, torch.Tensor):
                values = torch.tensor(list(values), dtype=torch.float64)  # exact before any cast
            ids, values = ids.to(device=device, dtype=torch.long), values.to(device=device, dtype=dtype)
            hit = self._device_cache[key] = (ids, values)
        return hit
