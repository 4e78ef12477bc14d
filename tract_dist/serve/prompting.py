"""Turning the OpenAI and OpenRLHF request shapes into judge inputs, and judgements back into their answers.

Pure Python (no torch), linear in the request's size: the ingress runs it (in a worker thread) to reject bad
requests before a replica sees them.

OpenRLHF's remote reward client (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``; older versions
``openrlhf/utils/remote_rm_utils.py``) posts ``{"query": [...], "prompts": [...], "labels": [...]}`` and reads
``{"rewards": [...]}`` (and ``scores``, for its dynamic filtering). A query is the policy's prompt and
response concatenated, the policy's chat template included; :mod:`tract_dist.serve.templates` splits it.
The rubric (criteria, one description per score) comes from ``labels[i]`` when it is a JSON object (or a JSON
string of one) with ``criteria`` and ``score_descriptions`` (and optionally ``reference_answer``); a plain
string label is the reference answer; otherwise the server's ``--rubric`` applies.
"""

from __future__ import annotations

import json
from typing import Any

from tract_dist import jsontext
from tract_dist.data.prompts import normalize_feedback, parse_prompt, score_text
from tract_dist.protocol import RESULT_MARKER
from tract_dist.serve.templates import RequestError

__all__ = ["RequestError", "chat_to_fields", "completion_text", "rubric_from_label"]


# -- OpenAI chat completions -------------------------------------------------------------------------------
def chat_to_fields(messages: list[Any], scale: tuple[int, int]) -> dict[str, Any]:
    """The judge input held by the last user message: a Prometheus absolute-grading prompt (the layout
    :func:`tract_dist.data.prompts.render_prompt` writes and prometheus-eval sends). Its rubric must have the
    server's scale. System messages are not used: the judge keeps the system prompt it was trained with."""
    idx = max(i for i, m in enumerate(messages) if m.role == "user")
    text = messages[idx].text()
    field = f"messages.{idx}.content"
    try:
        p = parse_prompt(text)  # linear; refuses a prompt whose fields quote the section headers
    except ValueError as e:
        raise RequestError(field, str(e)) from None
    if (p["scale_min"], p["scale_max"]) != tuple(scale):
        raise RequestError(field, f"the rubric's scale is {p['scale_min']}-{p['scale_max']}; this judge scores "
                                  f"{scale[0]}-{scale[1]}")
    return {k: p[k] for k in ("instruction", "response", "reference_answer", "criteria", "score_descriptions")}


def completion_text(result: dict[str, Any], scale: tuple[int, int]) -> str:
    """Prometheus-style feedback ending ``[RESULT] n``, n = the RAIL score (or decoded mean) rounded half up:
    the first CoT without any score statement of its own, then the marker."""
    cots = result.get("cots") or []
    feedback = normalize_feedback(cots[0]) if cots else ""
    n = score_text(float(result["score"]), scale[0], scale[1])
    return f"{feedback} {RESULT_MARKER} {n}" if feedback else f"{RESULT_MARKER} {n}"


# -- OpenRLHF remote reward model --------------------------------------------------------------------------
def rubric_from_label(label: Any, default: dict[str, Any] | None, index: int) -> dict[str, Any]:
    """criteria, score_descriptions (and reference_answer) for query ``index`` from its label or the default."""
    rubric: dict[str, Any] = dict(default or {})
    if isinstance(label, str) and label.strip().startswith("{"):
        try:
            label = jsontext.loads(label)  # deep nesting: a JSONDecodeError too, so a 4xx
        except json.JSONDecodeError as e:
            raise RequestError(f"labels.{index}", f"looks like JSON but does not parse: {e}") from None
    if isinstance(label, dict):
        unknown = set(label) - {"criteria", "score_descriptions", "reference_answer"}
        if unknown:
            raise RequestError(f"labels.{index}", f"unknown key(s) {sorted(unknown)}")
        rubric.update({k: v for k, v in label.items() if v is not None})
    elif isinstance(label, str) and label.strip():
        rubric["reference_answer"] = label
    elif label not in (None, ""):
        raise RequestError(f"labels.{index}", f"expected a string or an object, got {type(label).__name__}")
    for key in ("criteria", "score_descriptions"):
        if not rubric.get(key):
            raise RequestError(f"labels.{index}", f"no {key}: give it in the label (a JSON object) or start the "
                                                  "server with --rubric FILE")
    return rubric
