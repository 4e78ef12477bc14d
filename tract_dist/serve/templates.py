"""Chat-template families, to split an RL policy's query into the instruction and the response a judge grades.

OpenRLHF sends a query as the policy's chat-templated prompt followed by its response, in the *policy's*
template, which need not be the judge's (a Llama-3 policy judged by a ChatML judge). Splitting it with the
judge's markers would grade template text (``<|start_header_id|>...`` in the instruction, ``<|eot_id|>`` in the
response). So the template is detected from the query itself among the known families, named by the request
(``policy_template``) or the server (``--policy-template``), and the split result is checked: an instruction or
response that still holds a known template token is refused, never graded.

Families (their published chat templates; the offline tokenizers ``llama3``, ``mistral`` and ``smollm2`` of
:mod:`tract_dist.data.assets` are tested): ``llama3`` (Llama 3.x), ``chatml`` (Qwen, SmolLM2, ...), ``mistral``
(``[INST] ... [/INST]``), ``gemma``, ``phi3``; ``judge`` is the judge's own template read from its tokenizer (any
template), ``none`` a plain-text prompt (``prompts[i]`` must then be given). Detection: the family whose
marker occurs first in the text (a template wraps the whole conversation, so quoted markers come later);
the judge's template when no known family's marker occurs. All of it is ``str.find``/``rsplit``: linear in
the query's length, so it runs in the ingress.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

_SENTINEL = "TRACT_SENTINEL_7f3a9c"  # no whitespace: templates trim message content


class RequestError(ValueError):
    """A request that cannot be judged; ``field`` names the part of the body (for the 4xx answer)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ChatTemplate:
    """The text a chat template puts around turns: before a user message's content (``user_open``), between
    it and the reply (``assistant_open``), at the end of a user turn (``turn_end``, when the template has one),
    and the special tokens stripped from the ends of a part."""

    name: str
    user_open: str | None
    assistant_open: str | None
    turn_end: str | None = None
    special: tuple[str, ...] = ()
    signature: str | None = None  # the marker whose position identifies the family in a query

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatTemplate":
        return cls(**{**d, "special": tuple(d.get("special") or ())})


KNOWN: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate("llama3", "<|start_header_id|>user<|end_header_id|>\n\n",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>",
                           ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",
                            "<|finetune_right_pad_id|>"), "<|start_header_id|>"),
    "chatml": ChatTemplate("chatml", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>",
                           ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), "<|im_start|>"),
    "mistral": ChatTemplate("mistral", "[INST]", "[/INST]", "[/INST]", ("<s>", "</s>"), "[INST]"),
    "gemma": ChatTemplate("gemma", "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>",
                          ("<bos>", "<eos>", "<end_of_turn>", "<pad>"), "<start_of_turn>"),
    "phi3": ChatTemplate("phi3", "<|user|>\n", "<|assistant|>\n", "<|end|>", ("<|end|>", "<|endoftext|>", "<s>"),
                         "<|user|>"),
}
ALIASES = {"qwen": "chatml", "smollm2": "chatml"}
CHOICES = ("auto", *KNOWN, "judge", "none")
"""What ``--policy-template`` and a request's ``policy_template`` accept (plus the aliases qwen, smollm2)."""

# Template text that must never reach a graded instruction or response: any "<|name|>" special token (Llama 3,
# ChatML, Phi and many more spell theirs so) and the other families' turn markers. Generic ones ("<s>", "</s>",
# "<bos>"...) are left out: they also occur in ordinary text (HTML, prose about tokenizers) and are only
# stripped from the ends. The pattern is a bounded character class between literals: linear, no backtracking.
RESIDUE_RE = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<start_of_turn>|<end_of_turn>|\[/?INST\]")


def judge_template(tokenizer: Any) -> ChatTemplate:
    """The judge's own template as a :class:`ChatTemplate`, read by rendering one user turn through it."""
    names = set(getattr(tokenizer, "all_special_tokens", []))  # bos/eos/pad; the template's headers are
    names |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()  # added special ones
              if getattr(t, "special", False) and t.content in _template_text(tokenizer)}
    special = tuple(sorted((t for t in names if t), key=len, reverse=True))
    if not getattr(tokenizer, "chat_template", None):
        return ChatTemplate("judge", None, None, special=special)
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                         tokenize=False)
    if _SENTINEL not in text:
        return ChatTemplate("judge", None, None, special=special)
    before, after = text.split(_SENTINEL, 1)
    at = before.rfind("user")
    if at >= 0:  # from the last special token before the role name: "<|im_start|>user\n"
        starts = [before.rfind(t, 0, at) for t in special]
        start = max((s for s in starts if s >= 0), default=-1)
        user_open: str | None = before[start:] if start >= 0 else before[at:]
    else:  # no role name (Mistral's "<s>[INST] "): the header minus leading special tokens
        rest = before
        for t in special:
            rest = rest[len(t):] if t and rest.startswith(t) else rest
        user_open = rest if rest.strip() else None
    assistant_open = after or None
    turn_end = assistant_open.split("\n")[0].strip() or None if assistant_open else None
    return ChatTemplate("judge", user_open, assistant_open, turn_end, special, assistant_open)


def _template_text(tokenizer: Any) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else json.dumps(t) if t is not None else ""


def resolve(name: str | None, text: str, judge: ChatTemplate | None) -> ChatTemplate | None:
    """The template to split ``text`` with: the named one, or (``auto``/None) the detected one; None: plain."""
    name = ALIASES.get(name or "auto", name or "auto")
    if name == "none":
        return None
    if name == "judge":
        return judge
    if name in KNOWN:
        return KNOWN[name]
    found = [(text.find(t.signature), t) for t in KNOWN.values() if t.signature]
    found = [(i, t) for i, t in found if i >= 0]
    if found:
        return min(found, key=lambda x: x[0])[1]
    if judge is not None and judge.assistant_open and judge.assistant_open in text:
        return judge
    return None


def _strip_special(text: str, special: tuple[str, ...]) -> str:
    """``text`` without leading and trailing special tokens and whitespace."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for t in special:
            if t and text.endswith(t):
                text, changed = text[: -len(t)].rstrip(), True
            if t and text.startswith(t):
                text, changed = text[len(t):].lstrip(), True
    return text


def _instruction(prompt: str, t: ChatTemplate) -> str:
    """The last user turn's content of a templated prompt."""
    text = prompt.rstrip()
    if t.assistant_open and text.endswith(t.assistant_open.rstrip()):
        text = text[: -len(t.assistant_open.rstrip())]
    if t.user_open and t.user_open.strip() in text:
        text = text.rsplit(t.user_open.strip(), 1)[1]
        if t.turn_end and t.turn_end in text:
            text = text.split(t.turn_end, 1)[0]
    return _strip_special(text, t.special)


def split_query(query: str, prompt: str | None, index: int, *, template: str | None = None,
                judge: ChatTemplate | None = None) -> tuple[str, str]:
    """(instruction, response) of one OpenRLHF query (see the module docstring); ``RequestError`` naming
    ``query.<index>`` when it cannot be split, or when template text would be graded."""
    field = f"query.{index}"
    t = resolve(template, prompt or query, judge)
    if template not in (None, "auto") and t is not None and t.signature and t.signature not in query:
        raise RequestError(field, f"the query holds no '{t.signature}': it is not in the {t.name} chat template "
                                  "that was named (policy_template / --policy-template)")
    if prompt and query.startswith(prompt):
        head, response = prompt, query[len(prompt):]
    elif t is not None and t.assistant_open and t.assistant_open in query:
        head, response = query.rsplit(t.assistant_open, 1)
    else:
        raise RequestError(field, "cannot be split into prompt and response: it does not start with prompts[i] "
                                  "and has no assistant header of a known chat template; send prompts (OpenRLHF "
                                  "does) with each query, or name the policy's template (policy_template)")
    special = t.special if t is not None else ()
    if judge is not None:
        special = tuple(dict.fromkeys(special + judge.special))
    response = _strip_special(response, special)
    instruction = _instruction(head, t) if t is not None else _strip_special(head, special)
    if not instruction:
        raise RequestError(field, "the prompt part is empty")
    if not response:
        raise RequestError(field, "the response part is empty")
    for part, text in (("instruction", instruction), ("response", response)):
        left = RESIDUE_RE.search(text)
        if left:
            how = f"the {t.name} chat template" if t is not None else "no chat template"
            raise RequestError(field, f"after splitting with {how}, the {part} still holds chat-template text "
                                      f"({left.group(0)!r}); it would be graded as content. Name the policy's "
                                      f"template ({', '.join(CHOICES)}) in policy_template or with "
                                      "--policy-template")
    return instruction, response
