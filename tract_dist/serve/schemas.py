"""Request bodies of the judge server, validated by pydantic before anything reaches a model replica.

Every limit is here so that a malformed or hostile request costs the ingress a parse, never a replica: a
missing or mistyped field, an unknown field (a typo would otherwise be ignored silently), an over-long text,
an unknown mode or too many inputs is a 4xx whose message names the field (``inputs.0.response``). Numbers and
switches are strict: ``"seed": "5"``, ``"n_cots": true`` or ``"n_cots": 2.0`` are refused, not coerced.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag, ValidationError,
                      model_validator)

MAX_TEXT_CHARS = 100_000
"""Longest instruction, response or reference answer: far above any benchmark record (Feedback Collection's
longest response is ~10k characters) and far below what would make tokenisation itself costly; longer token
sequences are truncated to ``data.max_length`` by the judge (``truncated`` in the result)."""
MAX_RUBRIC_CHARS = 20_000  # criteria / one score description
MAX_INPUTS = 64
"""Inputs per /v1/judge or /get_reward request: each becomes one batched call, so a request cannot monopolise
the replicas for longer than the per-request timeout allows anyway; split larger jobs (or use ``tract-dist
judge --file``)."""
MAX_N_COTS = 16  # CoTs per input; the paper reports 1 and 5
MAX_BODY_BYTES = 4 << 20  # default --max-body-bytes: 64 inputs of ~60 KiB each
MAX_MESSAGES = 64
MAX_CHAT_CHARS = 4 * MAX_TEXT_CHARS
"""Longest chat message (a string, or the text parts of one together): a Prometheus prompt holds an
instruction, a response, a reference answer and a rubric, each capped as above."""
MAX_TEXT_PARTS = 64  # content parts per chat message
MAX_HEADER_BYTES = 32 << 10
"""Request headers, names and values together: nginx's default for a request's headers (4 x 8 KiB buffers);
OpenAI clients send well under 2 KiB. Checked before authentication."""

Mode = Literal["cot_rail", "decode", "rail"]
PolicyTemplate = Literal["auto", "llama3", "chatml", "qwen", "smollm2", "mistral", "gemma", "phi3", "judge", "none"]
_SCORE_KEY = re.compile(r"score(\d{1,2})_description\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class JudgeInput(BaseModel):
    """One input in the project's fields (``tract-dist judge --json``); the rubric's descriptions either as the
    list ``score_descriptions`` (lowest score first) or as prometheus-eval's ``score1_description`` ... keys."""

    model_config = ConfigDict(extra="allow")

    id: str | None = Field(None, max_length=256, description="echoed back; also seeds the input's sampled CoTs")
    instruction: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    response: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    criteria: str = Field(min_length=1, max_length=MAX_RUBRIC_CHARS)
    score_descriptions: list[str] | None = Field(None, max_length=20)
    reference_answer: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    @model_validator(mode="after")
    def _rubric(self) -> "JudgeInput":
        extra = dict(self.__pydantic_extra__ or {})
        keyed: dict[int, str] = {}
        for k, v in extra.items():
            m = _SCORE_KEY.match(k)
            if m is None:
                raise ValueError(f"unknown field {k!r} (expected instruction, response, criteria, "
                                 "score_descriptions or scoreN_description, reference_answer, id)")
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{k}: expected a non-empty string")
            if len(v) > MAX_RUBRIC_CHARS:
                raise ValueError(f"{k}: longer than {MAX_RUBRIC_CHARS} characters")
            keyed[int(m.group(1))] = v
        if keyed and self.score_descriptions is not None:
            raise ValueError("give score_descriptions or scoreN_description fields, not both")
        if keyed:
            lo = min(keyed)
            if sorted(keyed) != list(range(lo, lo + len(keyed))):
                raise ValueError(f"scoreN_description keys are not consecutive: {sorted(keyed)}")
            self.score_descriptions = [keyed[k] for k in sorted(keyed)]
        if not self.score_descriptions:
            raise ValueError("score_descriptions: missing (one description per score value, lowest first)")
        for i, d in enumerate(self.score_descriptions):
            if not d.strip() or len(d) > MAX_RUBRIC_CHARS:
                raise ValueError(f"score_descriptions.{i}: expected a non-empty string of at most "
                                 f"{MAX_RUBRIC_CHARS} characters")
        return self

    def fields(self, index: int) -> dict[str, Any]:
        """The dict :func:`tract_dist.judge.as_example` accepts (the id defaults to the input's position)."""
        return {"id": self.id if self.id is not None else str(index), "instruction": self.instruction,
                "response": self.response, "criteria": self.criteria,
                "score_descriptions": list(self.score_descriptions or []), "reference_answer": self.reference_answer}


class PairInput(_Strict):
    """One relative-grading input: two responses to one instruction and the evaluation criteria (prometheus-eval's
    ``relative_grade`` fields; ``data.relative.PairExample``)."""

    id: str | None = Field(None, max_length=256, description="echoed back; also seeds the input's sampled CoTs")
    instruction: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    response_a: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    response_b: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    rubric: str = Field(min_length=1, max_length=MAX_RUBRIC_CHARS)
    reference_answer: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    def fields(self, index: int) -> dict[str, Any]:
        """The dict :func:`tract_dist.judge.relative.as_pair` accepts."""
        return {"id": self.id if self.id is not None else str(index), "instruction": self.instruction,
                "response_a": self.response_a, "response_b": self.response_b, "rubric": self.rubric,
                "reference_answer": self.reference_answer}


def _input_kind(v: Any) -> str:
    """An input with ``response_a`` or ``response_b`` is a pair; anything else a single response."""
    keys = v.keys() if isinstance(v, dict) else vars(v) if hasattr(v, "__dict__") else ()
    return "pair" if "response_a" in keys or "response_b" in keys else "single"


AnyInput = Annotated[Annotated[JudgeInput, Tag("single")] | Annotated[PairInput, Tag("pair")],
                     Discriminator(_input_kind)]


class JudgeRequest(_Strict):
    """``POST /v1/judge``: ``input`` (one) or ``inputs`` (a list), plus options. An input is absolute grading
    (``response``, ``criteria``, ``score_descriptions``) or relative grading (``response_a``, ``response_b``,
    ``rubric``); one request may mix both."""

    input: AnyInput | None = None
    inputs: list[AnyInput] | None = Field(None, min_length=1, max_length=MAX_INPUTS)
    mode: Mode | None = Field(None, description="default: evaluation.mode of the server's config")
    n_cots: StrictInt | None = Field(None, ge=1, le=MAX_N_COTS, description="default: evaluation.num_cots")
    seed: StrictInt | None = Field(None, ge=0, le=2**32 - 1, description="default: generation.seed")
    swap: StrictBool = Field(False, description="pairs: judge each in both orders as well (position-swap check)")

    @model_validator(mode="after")
    def _one_of(self) -> "JudgeRequest":
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of input (one object) or inputs (a list)")
        return self

    def all_inputs(self) -> list[JudgeInput | PairInput]:
        return [self.input] if self.input is not None else list(self.inputs or [])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_CHAT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls, ...: accepted and unused
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(None)

    @model_validator(mode="after")
    def _capped(self) -> "ChatMessage":
        if isinstance(self.content, str):
            n = len(self.content)
        elif self.content is not None:
            if len(self.content) > MAX_TEXT_PARTS:
                raise ValueError(f"content: {len(self.content)} parts; at most {MAX_TEXT_PARTS}")
            n = sum(len(p.text) for p in self.content)
        else:
            n = 0
        if n > MAX_CHAT_CHARS:
            raise ValueError(f"content: {n} characters; at most {MAX_CHAT_CHARS}")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's body. Fields a judge has no use for (temperature, max_tokens,
    user, ...) are accepted and ignored, so the openai SDK and LiteLLM work unchanged; ``mode`` and ``n_cots``
    may be added (the SDK's ``extra_body``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request: the judgement is the answer")
    stream: StrictBool = Field(False)
    seed: StrictInt | None = Field(None, ge=0, le=2**32 - 1)
    mode: Mode | None = None
    n_cots: StrictInt | None = Field(None, ge=1, le=MAX_N_COTS)

    @model_validator(mode="after")
    def _no_stream(self) -> "ChatCompletionRequest":
        if self.stream:
            raise ValueError("stream: streaming is not supported (a judgement is one read-out); set stream=false")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: no user message (it must hold the Prometheus-style grading prompt)")
        return self


class RewardRequest(BaseModel):
    """``POST /get_reward``: OpenRLHF's remote reward-model body. ``query`` is required; ``prompts`` and
    ``labels`` are what newer OpenRLHF versions send alongside (see :mod:`tract_dist.serve.prompting`)."""

    model_config = ConfigDict(extra="ignore")  # e.g. OpenRLHF's "metadata"

    query: list[str] = Field(min_length=1, max_length=MAX_INPUTS)
    prompts: list[str] | None = Field(None, max_length=MAX_INPUTS)
    labels: list[Any] | None = Field(None, max_length=MAX_INPUTS)
    mode: Mode | None = None
    n_cots: StrictInt | None = Field(None, ge=1, le=MAX_N_COTS)
    seed: StrictInt | None = Field(None, ge=0, le=2**32 - 1)
    policy_template: PolicyTemplate | None = Field(
        None, description="the chat template of the queries (see serve/templates.py); default: --policy-template")

    @model_validator(mode="after")
    def _lengths(self) -> "RewardRequest":
        for name in ("prompts", "labels"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.query):
                raise ValueError(f"{name}: {len(v)} entries for {len(self.query)} queries")
        for name in ("query", "prompts"):
            for i, q in enumerate(getattr(self, name) or []):
                if len(q) > 2 * MAX_TEXT_CHARS:
                    raise ValueError(f"{name}.{i}: longer than {2 * MAX_TEXT_CHARS} characters")
        return self


_NOT_IN_PATHS = ("__root__", "single", "pair")  # the input kinds' tags (``AnyInput``) are not fields


def describe_errors(e: ValidationError) -> tuple[str, str | None]:
    """(message naming every bad field, the first field's dotted path) for a pydantic error."""
    parts, first = [], None
    for err in e.errors(include_url=False)[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in _NOT_IN_PATHS)
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if first is None and loc:
            first = loc
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(e.errors()) - 10
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else ""), first
