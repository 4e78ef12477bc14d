"""LoRA adapter folders as model paths: a LoRA stage 1 can generate and judge without a merged export.

A folder holding ``adapter_config.json`` (what ``train/export.py`` writes to ``export/adapter``) is served on its
base model with the adapter unmerged: PEFT's ``PeftModel`` in the HF backend, a ``LoRARequest`` in vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(path: str) -> dict[str, Any] | None:
    """The PEFT adapter config of ``path``, or None when ``path`` is not an adapter folder."""
    p = Path(path) / ADAPTER_CONFIG
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def adapter_base(path: str) -> str | None:
    """The base model an adapter folder was trained on (aliases materialised), or None for a plain model."""
    cfg = adapter_config(path)
    if cfg is None:
        return None
    base = cfg.get("base_model_name_or_path")
    if not base:
        from tract_dist.data.schema import DataError

        raise DataError(str(Path(path) / ADAPTER_CONFIG), "names no base model", field_name="base_model_name_or_path")
    from tract_dist.models.loading import materialize_alias

    return materialize_alias(str(base))


def adapter_rank(path: str) -> int:
    """The LoRA rank of an adapter folder (vLLM sizes its LoRA buffers with it)."""
    cfg = adapter_config(path) or {}
    ranks = [int(cfg.get("r") or 8), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)
