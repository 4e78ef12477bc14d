"""The shared inference runtime: engines behind one interface (HF generate, vLLM), the Ray Data replica pool,
and the one Ray start-up. Used by generate/, judge/ and evaluate/ (and nothing here imports them).

- ``engine``: the interface (``generate``, ``score_probs``), ``EngineSpec``, CoT extraction shared by backends
- ``hf_engine`` / ``vllm_engine``: the two backends (``vllm`` is imported only when a vLLM engine is built)
- ``backend``: ``auto | hf | vllm`` resolution, building (one cached in-process engine), release
- ``adapters``: PEFT LoRA adapter folders served unmerged
- ``sampling``: sampling parameters and per-(example, CoT) seeds
- ``pool``: map rows through a Ray Data actor pool of replicas (or in-process)
- ``ray_cluster``: connect to Ray or start a local one sized for the machine
"""
