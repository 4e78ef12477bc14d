"""Model integration: hidden states, lm_head access (tied, PEFT, ZeRO-3) and the CoT-RAFT loss on HF causal LMs."""

from .cot_raft import (
    CotRaftCausalLM,
    CotRaftHead,
    CotRaftOutput,
    LossRows,
    causal_lm_cot_raft_loss,
    select_loss_rows,
)
from .hidden import final_hidden_states, lm_head_parameters, unwrap_causal_lm
from .tiny import build_tiny_model, deterministic_state_dict, tiny_llama_config
from .zero3 import is_zero3_param, register_external_params

__all__ = [
    "CotRaftCausalLM",
    "CotRaftHead",
    "CotRaftOutput",
    "LossRows",
    "build_tiny_model",
    "causal_lm_cot_raft_loss",
    "deterministic_state_dict",
    "final_hidden_states",
    "is_zero3_param",
    "lm_head_parameters",
    "register_external_params",
    "select_loss_rows",
    "tiny_llama_config",
    "unwrap_causal_lm",
]
