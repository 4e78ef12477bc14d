"""CoT-RAFT training: a plain worker loop (torchrun or Ray Train) around DeepSpeed ZeRO-3."""
