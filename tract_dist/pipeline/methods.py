"""The pipeline's methods and how each evaluates (kept free of imports: the plan reads it without the pipeline).

``tract`` (two stages), ``cot_raft`` (stage 1 only), ``ce_cot`` (CE only, lambda = 0 with CE on the score
token; evaluated by decoding and by CoT-RAIL), ``raft`` (score-only targets without CoT; RAIL inference),
``real`` (TRACT's stages, then REAL's RL stage from the stage-2 export, or from ``pipeline.real_init``).
"""

from __future__ import annotations

EVAL_MODES: dict[str, tuple[str, ...]] = {"tract": ("cot_rail",), "cot_raft": ("cot_rail",),
                                          "ce_cot": ("decode", "cot_rail"), "raft": ("rail",), "real": ("cot_rail",)}
"""The inference modes each method's models are evaluated in (one evaluation stage per benchmark and mode)."""
