"""Tile sizes of the fused loss, from a per-device memory budget.

The fused loss walks (active rows) x (vocabulary) in tiles of ``chunk x shard`` logits. Two costs pull
the chunk in opposite directions:

* memory: the tile (and, on the PyTorch path, a bounded fp32 work block) is the only thing that grows
  with the chunk;
* the weight gradient: every chunk adds ``dl^T @ h`` into the (V x H) fp32 accumulator, which is read
  and written once per chunk (V x H x 8 bytes: 4.2 GB at V = 128256, H = 4096). With a single chunk
  there is no accumulator at all: the one matmul writes the gradient in the weight's dtype.

So the chunk is as large as the budget allows, and the active rows are split into equal chunks (no
small last chunk). Vocabulary shards only exist to bound the tile for very large vocabularies; one
shard avoids recomputing the logits in the gradient pass.
"""

from __future__ import annotations

import torch

#: CUDA tile budget. At V = 128256 in bf16 this is a 4096-row tile: the paper's 16384-token uniform batch
#: takes 4 chunks, so the fp32 weight-gradient accumulator (2.1 GB at H = 4096) is written once and
#: read-modified-written 3 times, ~15 GB of traffic or ~3.5 ms at the ~4.3 TB/s copy rate measured on
#: H200s (5 % of the ~65 ms matmul roofline); a realistic batch (80 % prompt, ~3.3K active rows) is one
#: chunk and needs no accumulator. Halving it doubles that traffic without lowering the peak, which the
#: fp32 accumulator plus the bf16 gradient (3.2 GB at that shape) sets, not the tile.
CUDA_TILE_BYTES = 1 << 30
#: CPU tile budget: large enough that a 2048-token realistic batch at V = 128256 (~412 active rows,
#: 106 MB in bf16) is one chunk, small enough to stay well below a materialised N x V fp32 logits tensor
#: (1 GB at that shape). CPU elementwise work is done in cache-sized row blocks (``block_rows``).
CPU_TILE_BYTES = 1 << 28
#: A local vocabulary up to this size is one shard (single pass, no logits recompute).
MAX_SINGLE_SHARD = 1 << 17
#: Shard size beyond ``MAX_SINGLE_SHARD``.
LARGE_VOCAB_SHARD = 1 << 16
#: The budget's chunk cap is a multiple of this many rows (tensor-core and AMX tile friendly).
ROW_MULTIPLE = 64
#: Balanced chunks are rounded up to this many rows (16-byte aligned bf16 rows of the tile).
ROW_ALIGN = 8
#: fp32 work block of the PyTorch tile ops on CPU: 16 MiB (32 rows at V = 128256). Every op on a block opens
#: an OpenMP parallel region, so cache-sized blocks of a few rows pay that fixed cost hundreds of times per
#: tile; and glibc serves requests of 32 MiB and more with a fresh mmap, whose page faults then cost as much as
#: the arithmetic. 16 MiB blocks stay on the reused heap and keep the fp32 temporary a fraction of an fp32 copy
#: of the tile.
CPU_BLOCK_BYTES = 1 << 24
#: On CUDA the PyTorch tile ops (kernel="torch") work on blocks of this many fp32 elements (256 MiB):
#: few kernel launches, bounded temporaries.
CUDA_BLOCK_ELEMENTS = 1 << 26


def default_tile_bytes(device: torch.device) -> int:
    return CUDA_TILE_BYTES if device.type == "cuda" else CPU_TILE_BYTES


def vocab_shard_size(v_local_max: int, vocab_shard: int | None) -> int:
    """The whole local vocabulary when it fits one shard, else ``LARGE_VOCAB_SHARD`` rows."""
    if vocab_shard is not None:
        return vocab_shard
    return max(v_local_max, 1) if v_local_max <= MAX_SINGLE_SHARD else LARGE_VOCAB_SHARD


def chunk_rows(n_active: int, shard: int, elem_bytes: int, tile_bytes: int, chunk_size: int | None) -> int:
    """Rows per chunk: the given ``chunk_size``, else the budget's, balanced over the chunks needed.

    Depends only on values that every vocab-parallel rank shares (the active row count, the largest
    shard), so all ranks run the same number of chunks and so the same collectives.
    """
    if chunk_size is not None:
        return chunk_size
    cap = max(tile_bytes // max(shard * elem_bytes, 1), 16)
    if cap > ROW_MULTIPLE:
        cap -= cap % ROW_MULTIPLE
    if n_active <= cap:
        return max(n_active, 1)
    n_chunks = -(-n_active // cap)
    rows = -(-n_active // n_chunks)  # equal chunks: the last one is not a small remainder
    rows += (-rows) % ROW_ALIGN
    return min(rows, cap)


def block_rows(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Rows per fp32 work block of the PyTorch tile ops (row blocks of a row-major tile are contiguous)."""
    elements = CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_BYTES // 4
    return max(1, min(n_rows, elements // max(n_cols, 1)))
