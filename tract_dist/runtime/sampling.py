"""Sampling parameters and per-example randomness.

Why per-example generators: Hugging Face's sampler draws from one global RNG, so a row's sample depends on
which other rows share its batch. A resumed run regroups the missing examples into new batches, and a pool of
replicas interleaves them arbitrarily; with one ``torch.Generator`` per (example, CoT index), seeded from a hash
of the id, each CoT depends only on its own prompt and seed, so reruns and resumptions reproduce it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_config(cls, gen: Any, *, greedy: bool = False, stop: bool = True) -> "SamplingParams":
        """From a ``GenerationSection``; ``greedy`` forces temperature 0, ``stop=False`` drops the stop strings."""
        return cls(temperature=0.0 if greedy else gen.temperature, top_p=gen.top_p,
                   repetition_penalty=gen.repetition_penalty, max_new_tokens=gen.max_new_tokens,
                   stop=tuple(gen.stop) if stop else ())


def example_seed(base_seed: int, example_id: str, cot_index: int) -> int:
    """A 63-bit seed that depends only on (base seed, example id, CoT index): stable across runs and machines."""
    digest = hashlib.sha256(f"{base_seed}\x1f{example_id}\x1f{cot_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PerRowSampler:
    """A logits processor that samples each row with its own generator and returns a one-hot score row.

    Used with greedy decoding (``do_sample=False``) so the argmax is exactly the sampled token. Hugging Face
    applies its own processors first (repetition penalty), then this one: temperature, top-p (nucleus), draw.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        chosen = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0]
                              for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen[:, None], 0.0)
        return out
