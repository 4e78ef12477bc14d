"""Names and builders shared by the serve tests and their conftest."""

from __future__ import annotations

import socket

API_KEY = "test-key-" + "0123456789abcdef"
SMOL_ID = "smollm2-judge"
LOAD_ID = "tiny-judge"
SLOW_ID = "tiny-slow-judge"
SLOW_TIMEOUT_S = 6.0
SLOW_BUDGET = 60
"""The deadline app: a tiny model whose sampled CoTs cost far more than the greedy one-row decode step the
ingress's work bound uses (the top-p sampler sorts the vocabulary per row and step: ~0.2-1 s a step for 64
rows on cpu-2core against ~5 ms for one greedy row), so a 64-row request passes the bound (60 steps of 5 ms:
0.3 s; refused only if one step took 100 ms) and still runs far past its 6 s deadline (60 steps: 12-60 s)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge_config(model_path: str, *extra: str):
    """The served judge's config: float32 (exactness), HF, the default mode (cot_rail, one greedy CoT) with a
    serving budget of 8 new tokens (a SmolLM2 decode step costs ~50-100 ms on cpu-2core)."""
    from tract_dist.config import load_config

    overrides = ["model.dtype=float32", "evaluation.backend=hf", "tracking.enabled=false", "serve.max_new_tokens=8",
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
