"""CoT-RAFT joint loss: exact reference and a fused, chunked, vocab-parallel implementation."""

from .api import CoTRaftLossOutput, cot_raft_loss, cot_raft_loss_with_options
from .options import CoTRaftLossOptions

__all__ = ["CoTRaftLossOptions", "CoTRaftLossOutput", "cot_raft_loss", "cot_raft_loss_with_options"]
