"""Batched Hugging Face generation with left padding, per-row seeds and stop strings.

Shared by CoT generation (stage 2 data), the judge (CoT-RAIL and decode) and evaluation, so every stage
generates the same way. Left padding keeps every row's last prompt token at the same position, which
``generate`` needs for batched decoding; HF derives position ids from the attention mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from tract_dist.data.prompts import normalize_feedback
from tract_dist.generate.sampling import PerRowSampler, SamplingParams


@dataclass
class Generation:
    text: str  # decoded new tokens (special tokens removed), before any cut
    new_tokens: int  # generated tokens up to and including the stop/EOS token
    finish_reason: str  # "eos", "stop" (a stop string) or "length"


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """The text before the earliest stop string (the whole text when none occurs)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


_DANGLING = re.compile(r"(?:\s*(?:So the overall score is|\[RESULT\])\s*)+\Z", re.I)


def extract_cot(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """A generated text as a CoT that ends before the score: cut at stop strings, then normalise like training data."""
    return _DANGLING.sub("", normalize_feedback(cut_at_stop(text, stop))).strip()


class Engine:
    """A model + tokenizer that generates for batches of prompt ids. Built once per process (or Ray actor)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(eos)
        self._stop_cache: dict[tuple[str, ...], Any] = {}

    def _stopping(self, stop: tuple[str, ...]) -> Any:
        """Transformers' StopStringCriteria, built once per stop tuple (it pre-processes the whole vocabulary)."""
        if not stop:
            return None
        if stop not in self._stop_cache:
            from transformers import StoppingCriteriaList, StopStringCriteria

            self._stop_cache[stop] = StoppingCriteriaList([StopStringCriteria(self.tokenizer, list(stop))])
        return self._stop_cache[stop]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[Generation]:
        """Generate one continuation per prompt; row i samples with ``seeds[i]`` only (ignored when greedy)."""
        from transformers import GenerationConfig, LogitsProcessorList

        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False,
                                  repetition_penalty=params.repetition_penalty, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids or None, num_beams=1)
        processors = LogitsProcessorList()
        if not params.greedy:
            processors.append(PerRowSampler(seeds, params.temperature, params.top_p, self.device))
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config, logits_processor=processors,
                                  stopping_criteria=self._stopping(params.stop))
        results = []
        eos = set(self.eos_ids)
        for row in out[:, width:].tolist():
            n, reason = len(row), "length"
            for j, t in enumerate(row):  # finished rows are padded; EOS counts as generated, padding does not
                if t in eos or t == self.pad_id:
                    n, reason = (j + 1, "eos") if t in eos else (j, "stop")
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            if params.stop and any(s in text for s in params.stop):
                reason = "stop"
            results.append(Generation(text=text, new_tokens=n, finish_reason=reason))
        return results
