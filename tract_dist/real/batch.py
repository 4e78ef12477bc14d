"""Sampled CoTs as training rows: the judge's prompt, the CoT it wrote, the score phrase, the read-out position.

A REAL sample is ``prompt_ids + cot_ids`` with ``cot_ids`` the tokens of ``"{CoT} So the overall score is"``
exactly as TRACT's training targets and the CoT-RAIL read-out tokenise them (:func:`score_prompt_ids`), so the
read-out position is the sequence's last token (no score token, no EOS: the score is not sampled, the regression
term reads it). Labels cover the CoT's own tokens only: the fixed lead-in " So the overall score is" is the
read-out's, not a sampled action, and is masked when its tokens are the sequence's tail (counted otherwise).
The prompt is fitted once per example to ``data.max_length`` minus the CoT budget, so every sample of a prompt
shares the very prompt ids it was generated from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tract_dist.data.encode import DroppedExample, EncodeOptions, fit_prompt
from tract_dist.data.schema import JudgeExample
from tract_dist.data.score_tokens import ScoreTokens, score_prompt_ids
from tract_dist.protocol import IGNORE_INDEX

LEAD_MARGIN = 32
"""Tokens kept free beside the prompt and the CoT budget for the score phrase (6-8 tokens in every tokenizer the
project knows) and the re-tokenisation of a cut CoT."""


@dataclass
class RealSample:
    """One sampled CoT of one prompt, as the trainer consumes it (plain lists: it travels between processes)."""

    prompt: int  # the prompt's index in the round
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except the CoT's tokens
    score_position: int  # the last token: the row whose next-token distribution is read out
    score: float  # the gold score y
    yhat: float  # the RAIL read-out of the engine that sampled it
    old_logprobs: list[float]  # the sampling policy's log-prob of each label (aligned with labels; 0 elsewhere)
    new_tokens: int  # tokens the engine generated (before the CoT cut)
    finish_reason: str
    lead_masked: bool = True  # the score phrase's tokens were found at the tail and masked


class RealEncoder:
    """Prompt ids for generation and sampled CoTs as training rows, for one tokenizer and encoding setting."""

    def __init__(self, tokenizer: Any, score_tokens: ScoreTokens, opts: EncodeOptions, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.st = score_tokens
        self.opts = opts
        self.budget = opts.max_length - max_new_tokens - LEAD_MARGIN
        probe = tokenizer.encode("x", add_special_tokens=False)
        full = score_prompt_ids(tokenizer, "x", score_tokens)
        self.lead = full[len(probe):] if full[:len(probe)] == probe else []

    def prompt_ids(self, ex: JudgeExample) -> list[int]:
        """The chat-templated prompt within its budget (raises DroppedExample when it cannot fit)."""
        if self.budget < 16:
            raise DroppedExample("cot_budget_exceeds_max_length")
        return fit_prompt(self.tokenizer, ex, self.budget, self.opts)[0]

    def sample_row(self, prompt_ids: list[int], cot: str) -> tuple[list[int], list[int], bool]:
        """(input ids, labels, lead masked) of ``prompt + cot + ' So the overall score is'``."""
        cot_ids = score_prompt_ids(self.tokenizer, cot, self.st)
        labels = list(cot_ids)
        n = len(self.lead)
        lead_masked = bool(cot.strip()) and n > 0 and cot_ids[-n:] == self.lead
        if lead_masked:
            labels[-n:] = [IGNORE_INDEX] * n
        elif not cot.strip():  # an empty CoT: nothing was sampled to train
            labels = [IGNORE_INDEX] * len(cot_ids)
        return prompt_ids + cot_ids, [IGNORE_INDEX] * len(prompt_ids) + labels, lead_masked


def collate_samples(samples: list[RealSample], adv: list[float], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch: the model's batch keys plus ``adv`` (B,) and ``old_logprobs`` (B, T)."""
    length = max(len(s.input_ids) for s in samples)
    n = len(samples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    old = torch.zeros((n, length), dtype=torch.float64)
    for i, s in enumerate(samples):
        t = len(s.input_ids)
        ids[i, :t] = torch.tensor(s.input_ids)
        labels[i, :t] = torch.tensor(s.labels)
        mask[i, :t] = 1
        old[i, :t] = torch.tensor(s.old_logprobs, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "score_positions": torch.tensor([s.score_position for s in samples], dtype=torch.long),
            "score_targets": torch.tensor([s.score for s in samples], dtype=torch.float32),
            "adv": torch.tensor(adv, dtype=torch.float64), "old_logprobs": old}
