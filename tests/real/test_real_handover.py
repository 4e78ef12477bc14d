"""The LoRA hand-over on the HF engine (#25): see ``handover_check.py``. The same check on vLLM is
``benchmarks/real/check_vllm_handover.py`` (it asserts and prints): vLLM's CPU LoRA path costs ~30 s per check
beyond an engine start, more than the CI suite's budget on 2 cores allows."""

from __future__ import annotations

import pytest

from handover_check import check_hand_over

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(200)
def test_hf_engine_log_probs_equal_the_trainers_after_hand_over(smollm2_dir, quickstart_examples,
                                                                one_torch_thread):
    check_hand_over("hf", smollm2_dir, quickstart_examples[0])
