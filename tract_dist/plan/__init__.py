"""``tract-dist plan``: whether a run fits and how long it takes, from the model's config alone (meta device).

- ``known``: config.json fields of the models the project's configs name (planned with no download)
- ``shape``: a model's and its LoRA's shape from a meta-device build (parameters, largest layer, adapters)
- ``hardware``: accelerators' memory, bf16 peak and bandwidth
- ``memory``: per-GPU training memory (ZeRO states by DeepSpeed's estimator, activations, loss tile, buffers)
  and inference memory (weights per tensor-parallel rank, KV cache, engine workspace)
- ``compute``: FLOPs per step, decode and prefill rates, at a stated MFU
- ``report``: the plan of a run, stage by stage, and its text
- ``check``: the check ``train``, ``pipeline`` and ``submit`` run first (refuse, warn, or a one-line summary)
- ``commands``: the CLI
"""
