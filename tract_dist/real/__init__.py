"""REAL (regression-aware reinforcement learning for LLM-as-a-judge) after TRACT: the judge samples its own CoTs,
is rewarded by how close its RAIL read-out lands to the gold score, and learns by policy gradient (RLOO) plus the
CoT-RAFT regression term on its samples. Math in :mod:`.advantages` and :mod:`.objective`, rollouts on the
project's inference runtime in :mod:`.rollout`, the training stage in :mod:`.recipe` / :mod:`.stage`."""

from tract_dist.real.advantages import regression_rewards, rloo_advantages
from tract_dist.real.objective import TokenWeights, k3_kl, surrogate_token_weights

__all__ = ["TokenWeights", "k3_kl", "regression_rewards", "rloo_advantages", "surrogate_token_weights"]
