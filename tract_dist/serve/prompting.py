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

A pairwise reward: a label object with ``compare_to`` (a baseline response, e.g. the reference policy's or a
best-of-n sample's) makes the query a comparison, the policy's response as A; the reward is the debiased
p(A) = (p_AB + 1 − p_BA) / 2 over both orders, in [0, 1] (``judge.relative``).
"""

from __future__ import annotations

import json
from typing import Any

from tract_dist import jsontext
from tract_dist.data.prompts import normalize_feedback, parse_prompt, score_text
from tract_dist.protocol import RESULT_MARKER
from tract_dist.serve.templates import RequestError

__all__ = ["RequestError", "chat_to_fields", "chat_to_pair", "completion_text", "pair_completion_text",
           "pair_from_label", "rubric_from_label"]


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


def chat_to_pair(messages: list[Any]) -> dict[str, Any] | None:
    """The pair held by the last user message when it is a Prometheus relative-grading prompt (two responses:
    ``data.relative.parse_relative_prompt``; what prometheus-eval's ``relative_grade`` sends), else None."""
    from tract_dist.data.relative import is_relative_prompt, parse_relative_prompt

    idx = max(i for i, m in enumerate(messages) if m.role == "user")
    text = messages[idx].text()
    if not is_relative_prompt(text):
        return None
    try:
        return parse_relative_prompt(text)
    except ValueError as e:
        raise RequestError(f"messages.{idx}.content", str(e)) from None


def pair_completion_text(result: dict[str, Any]) -> str:
    """Prometheus-style comparison ending ``[RESULT] A`` or ``B`` (what prometheus-eval's relative parser
    reads): the first comparison, then the verdict of p(A) (A at p(A) >= 0.5: the answer must name one)."""
    from tract_dist.data.relative import normalize_relative_feedback

    cots = result.get("cots") or []
    try:
        feedback = normalize_relative_feedback(cots[0]) if cots else ""
    except ValueError:  # a generated "[RESULT]" inside: keep the text before it
        feedback = cots[0].split(RESULT_MARKER)[0].strip()
    verdict = "A" if float(result["p_a"]) >= 0.5 else "B"
    return f"{feedback} {RESULT_MARKER} {verdict}" if feedback else f"{RESULT_MARKER} {verdict}"


def completion_text(result: dict[str, Any], scale: tuple[int, int]) -> str:
    """Prometheus-style feedback ending ``[RESULT] n``, n = the RAIL score (or decoded mean) rounded half up:
    the first CoT without any score statement of its own, then the marker."""
    cots = result.get("cots") or []
    feedback = normalize_feedback(cots[0]) if cots else ""
    n = score_text(float(result["score"]), scale[0], scale[1])
    return f"{feedback} {RESULT_MARKER} {n}" if feedback else f"{RESULT_MARKER} {n}"


# -- OpenRLHF remote reward model --------------------------------------------------------------------------
def _label_object(label: Any, index: int) -> Any:
    if isinstance(label, str) and label.strip().startswith("{"):
        try:
            return jsontext.loads(label)  # deep nesting: a JSONDecodeError too, so a 4xx
        except json.JSONDecodeError as e:
            raise RequestError(f"labels.{index}", f"looks like JSON but does not parse: {e}") from None
    return label


def pair_from_label(label: Any, default: dict[str, Any] | None, index: int) -> dict[str, Any] | None:
    """A pairwise reward's comparison for query ``index``: when its label (a JSON object) holds ``compare_to``
    (a baseline response), the pair's rubric (``rubric``, else ``criteria``, else the server's ``--rubric``
    criteria) and reference answer; None for an absolute-grading label."""
    label = _label_object(label, index)
    if not isinstance(label, dict) or "compare_to" not in label:
        return None
    unknown = set(label) - {"compare_to", "rubric", "criteria", "reference_answer"}
    if unknown:
        raise RequestError(f"labels.{index}", f"unknown key(s) {sorted(unknown)} beside compare_to")
    other = label["compare_to"]
    if not isinstance(other, str) or not other.strip():
        raise RequestError(f"labels.{index}.compare_to", "expected a non-empty string (the response to compare to)")
    rubric = label.get("rubric") or label.get("criteria") or (default or {}).get("criteria")
    if not isinstance(rubric, str) or not rubric.strip():
        raise RequestError(f"labels.{index}", "no rubric: give rubric (or criteria) in the label, or start the "
                                              "server with --rubric FILE")
    ref = label.get("reference_answer")
    if ref is not None and not isinstance(ref, str):
        raise RequestError(f"labels.{index}.reference_answer", "expected a string")
    return {"compare_to": other, "rubric": rubric, "reference_answer": ref}


def rubric_from_label(label: Any, default: dict[str, Any] | None, index: int) -> dict[str, Any]:
    """criteria, score_descriptions (and reference_answer) for query ``index`` from its label or the default."""
    rubric: dict[str, Any] = dict(default or {})
    label = _label_object(label, index)
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
