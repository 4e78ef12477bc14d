"""Turning the OpenAI and OpenRLHF request shapes into judge inputs, and judgements back into their answers.

Pure Python (no torch): the ingress uses it to reject bad requests before a replica sees them.

OpenRLHF's remote reward model (``openrlhf/utils/remote_rm_utils.py``) posts ``{"query": [...], "prompts":
[...], "labels": [...]}`` (older versions only ``query``) and reads ``{"rewards": [...]}``. A query is the
policy's prompt and response concatenated, chat template included. It is split into the instruction to
grade and the response as follows (:func:`split_query`):

1. the response: if ``prompts[i]`` is given and ``query[i]`` starts with it, the rest of the query; otherwise
   the text after the last occurrence of the chat template's assistant header (what the tokenizer's template
   puts between a user message and the reply, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``); trailing special
   tokens (EOS, end of turn, padding) are removed;
2. the instruction: the prompt part with the template removed: the content of its last user turn (after the
   template's user header, before the assistant header); without a template, the prompt text itself.

The rubric (criteria, one description per score) comes from ``labels[i]`` when it is a JSON object (or a
JSON string of one) with ``criteria`` and ``score_descriptions`` (and optionally ``reference_answer``); a
plain string label is the reference answer; otherwise the server's ``--rubric`` applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tract_dist.data.prompts import normalize_feedback, parse_prompt, score_text, section_marker_counts
from tract_dist.protocol import RESULT_MARKER

_SENTINEL = "TRACT_SENTINEL_7f3a9c"  # no whitespace: templates trim message content


class RequestError(ValueError):
    """A request that cannot be judged; ``field`` names the part of the body (for the 4xx answer)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# -- OpenAI chat completions -------------------------------------------------------------------------------
def chat_to_fields(messages: list[Any], scale: tuple[int, int]) -> dict[str, Any]:
    """The judge input held by the last user message: a Prometheus absolute-grading prompt (the layout
    :func:`tract_dist.data.prompts.render_prompt` writes and prometheus-eval sends). Its rubric must have the
    server's scale. System messages are not used: the judge keeps the system prompt it was trained with."""
    idx = max(i for i, m in enumerate(messages) if m.role == "user")
    text = messages[idx].text()
    field = f"messages.{idx}.content"
    try:
        p = parse_prompt(text)
    except ValueError as e:
        raise RequestError(field, str(e)) from None
    for marker, n in section_marker_counts(text).items():
        if n > 1:
            raise RequestError(field, f"the section marker '{marker}' occurs {n} times, so the prompt cannot be "
                                      "split into its fields unambiguously")
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
@dataclass(frozen=True)
class ChatMarkers:
    """The chat template's headers, as text: before a user message's content and between it and the reply."""

    user_open: str | None
    assistant_open: str | None
    special: tuple[str, ...]  # special-token strings stripped from the end of a response

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatMarkers":
        names = set(getattr(tokenizer, "all_special_tokens", []))  # bos/eos/pad; the template's headers are
        names |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()  # added special ones
                  if getattr(t, "special", False) and t.content in _template_text(tokenizer)}
        special = tuple(sorted((t for t in names if t), key=len, reverse=True))
        if not getattr(tokenizer, "chat_template", None):
            return cls(None, None, special)
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
        if _SENTINEL not in text:
            return cls(None, None, special)
        before, after = text.split(_SENTINEL, 1)
        user_open = None
        at = before.rfind("user")
        if at >= 0:  # from the last special token before the role name: "<|im_start|>user\n"
            starts = [before.rfind(t, 0, at) for t in special]
            start = max((s for s in starts if s >= 0), default=-1)
            user_open = before[start:] if start >= 0 else before[at:]
        else:  # no role name (Mistral's "<s>[INST] "): the header minus leading special tokens
            rest = before
            for t in special:
                rest = rest[len(t):] if t and rest.startswith(t) else rest
            user_open = rest if rest.strip() else None
        return cls(user_open, after or None, special)


def _template_text(tokenizer: Any) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else json.dumps(t) if t is not None else ""


def _strip_special_tail(text: str, special: tuple[str, ...]) -> str:
    text = text.rstrip()
    changed = True
    while changed:
        changed = False
        for t in special:
            if t and text.endswith(t):
                text = text[: -len(t)].rstrip()
                changed = True
    return text


def _instruction(prompt: str, markers: ChatMarkers) -> str:
    text = prompt
    if markers.assistant_open and text.rstrip().endswith(markers.assistant_open.rstrip()):
        text = text.rstrip()[: -len(markers.assistant_open.rstrip())]
    if markers.user_open and markers.user_open in text:
        text = text.rsplit(markers.user_open, 1)[1]
        if markers.assistant_open:  # a multi-turn prompt: cut at the end of that user turn
            head = markers.assistant_open.split("\n")[0].strip()
            if head and head in text:
                text = text.split(head, 1)[0]
    text = _strip_special_tail(text, markers.special)
    for t in markers.special:  # a leading BOS
        if t and text.startswith(t):
            text = text[len(t):]
    return text.strip()


def split_query(query: str, prompt: str | None, markers: ChatMarkers, index: int) -> tuple[str, str]:
    """(instruction, response) of one OpenRLHF query (see the module docstring for the rule)."""
    if prompt is not None and prompt and query.startswith(prompt):
        head, response = prompt, query[len(prompt):]
    elif markers.assistant_open and markers.assistant_open in query:
        head, response = query.rsplit(markers.assistant_open, 1)
    else:
        raise RequestError(f"query.{index}", "cannot be split into prompt and response: it does not start with "
                                             "prompts[i] and has no assistant header of the judge's chat template; "
                                             "send prompts (OpenRLHF does) with each query")
    response = _strip_special_tail(response, markers.special).strip()
    instruction = _instruction(head, markers)
    if not instruction:
        raise RequestError(f"query.{index}", "the prompt part is empty")
    if not response:
        raise RequestError(f"query.{index}", "the response part is empty")
    return instruction, response


def rubric_from_label(label: Any, default: dict[str, Any] | None, index: int) -> dict[str, Any]:
    """criteria, score_descriptions (and reference_answer) for query ``index`` from its label or the default."""
    rubric: dict[str, Any] = dict(default or {})
    if isinstance(label, str) and label.strip().startswith("{"):
        try:
            label = json.loads(label)
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
