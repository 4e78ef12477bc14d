"""Names and builders shared by the serve tests and their conftest."""

from __future__ import annotations

import socket

API_KEY = "test-key-" + "0123456789abcdef"
SMOL_ID = "smollm2-judge"
LOAD_ID = "tiny-judge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge_config(model_path: str, *extra: str):
    """The served judge's config: float32 (exactness), HF, rail by default, 16 new tokens for CoT tests."""
    from tract_dist.config import load_config

    overrides = ["model.dtype=float32", "evaluation.backend=hf", "evaluation.mode=rail", "tracking.enabled=false",
                 "generation.max_new_tokens=16", "data.max_length=1024", *extra]
    return load_config(None, overrides, base={"model": {"name_or_path": model_path}})


def short_inputs(examples, n: int, chars: int = 300) -> list[dict]:
    """Real quickstart records with responses cut to ``chars`` (a 260-400 token prompt: one SmolLM2 forward
    pass costs 1-2 s on a 2-core machine, and the prompt length is what it scales with); stripped, as the
    reward endpoint strips the response it splits off a query."""
    out = []
    for ex in examples[:n]:
        out.append({"id": f"ex-{ex.id}", "instruction": ex.instruction, "response": ex.response[:chars].strip(),
                    "criteria": ex.criteria, "score_descriptions": list(ex.score_descriptions)})
    return out
