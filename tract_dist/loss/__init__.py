"""CoT-RAFT joint loss: exact reference and a fused, chunked, vocab-parallel implementation."""

from .api import CoTRaftLossOutput, cot_raft_loss

__all__ = ["CoTRaftLossOutput", "cot_raft_loss"]
