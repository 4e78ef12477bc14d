"""Config builders for generation tests."""

from __future__ import annotations

from tract_dist.config import load_config


def gen_config(model: str, data_path, tmp_path, *extra: str):
    """A small in-process generation config over real Vicuna Bench prompts (the committed quickstart sample,
    project JSONL), tracking into a temp sqlite."""
    return load_config(None, [
        f"model.name_or_path={model}",
        f"data.train_path={data_path}", "data.train_format=jsonl", "data.max_length=640",
        "data.max_examples=5", "generation.max_new_tokens=6", "generation.num_cots=2", "generation.batch_size=3",
        "generation.shard_size=3", "generation.ray=false", "generation.temperature=1.0", "generation.top_p=0.9",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "cluster.num_workers=2", *extra,
    ])
