"""Per-example seeds, the per-row sampler and CoT extraction (no model)."""

from __future__ import annotations

import torch

from tract_dist.runtime.engine import cut_at_stop, extract_cot
from tract_dist.runtime.sampling import PerRowSampler, example_seed


def test_example_seed_depends_only_on_its_inputs():
    assert example_seed(0, "a", 0) == example_seed(0, "a", 0)
    seeds = {example_seed(s, i, j) for s in (0, 1) for i in ("a", "b", "ab") for j in (0, 1)}
    assert len(seeds) == 12
    assert all(0 <= s < 2**63 for s in seeds)


def _draws(sampler: PerRowSampler, scores: torch.Tensor, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        one_hot = sampler(torch.zeros(scores.shape[0], 1, dtype=torch.long), scores.clone())
        out.append(one_hot.argmax(-1).tolist())
        assert torch.isfinite(one_hot).sum(-1).eq(1).all()  # exactly one admissible token per row
    return [list(r) for r in zip(*out)]


def test_row_draws_do_not_depend_on_batch_partners():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 50, generator=g)
    together = _draws(PerRowSampler([11, 22, 33], 0.8, 0.9, torch.device("cpu")), scores, 20)
    alone = _draws(PerRowSampler([22], 0.8, 0.9, torch.device("cpu")), scores[1:2], 20)
    assert together[1] == alone[0]
    # and the draws are the same as sampling the reference nucleus distribution with that generator
    p = torch.softmax(scores[1] / 0.8, -1)
    sp, order = p.sort(descending=True)
    keep = (sp.cumsum(0) - sp) < 0.9
    ref = torch.zeros_like(p).scatter(0, order, sp * keep)
    gen = torch.Generator().manual_seed(22)
    assert alone[0] == [int(torch.multinomial(ref, 1, generator=gen)) for _ in range(20)]


def test_top_p_keeps_only_the_nucleus():
    scores = torch.tensor([[4.0, 3.9, -5.0, -6.0, -7.0]])
    draws = _draws(PerRowSampler([1], 1.0, 0.5, torch.device("cpu")), scores, 200)[0]
    assert set(draws) <= {0, 1} and 0 in draws
    greedyish = _draws(PerRowSampler([1], 1.0, 1e-6, torch.device("cpu")), scores, 50)[0]
    assert set(greedyish) == {0}


def test_cot_is_cut_before_the_score():
    stop = ("So the overall", "[RESULT]")
    assert cut_at_stop("good answer. So the overall score is 4", stop) == "good answer. "
    assert extract_cot("Feedback: good answer. [RESULT] 4", stop) == "good answer."
    assert extract_cot("Feedback: clear. So the overall", stop) == "clear."
    assert extract_cot("no stop here", stop) == "no stop here"
    assert extract_cot("   [RESULT] 5", stop) == ""
