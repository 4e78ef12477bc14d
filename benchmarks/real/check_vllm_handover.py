"""REAL's LoRA hand-over on vLLM (#25), out of the CI suite: the trainer's adapter, written as a PEFT folder and
served by the rollout worker's vLLM engine as a new ``LoRARequest``, gives the trainer's per-token log-probs and
RAIL read-out in fp32 on the real SmolLM2-135M (``tests/real/handover_check.py``, the HF variant of which runs in
the suite). Asserts, prints the differences, exits 1 on a mismatch, 2 when vLLM is not usable.

It is here rather than in tests/ because vLLM's CPU LoRA path takes ~12 s per ~500-token request on a 2-core
machine (one sampling and one scoring request: ~30 s beyond a ~30-60 s engine start), more than the suite's
budget allows.

    python benchmarks/real/check_vllm_handover.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    from tract_dist.runtime.backend import vllm_status

    ok, detail = vllm_status()
    if not ok:
        print(f"check_vllm_handover: vLLM is not usable: {detail}")
        return 2
    sys.path.insert(0, str(REPO / "tests" / "real"))
    from handover_check import check_hand_over

    from tract_dist.data.schema import JudgeExample
    from tract_dist.models.loading import materialize_alias

    quickstart = REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"
    example = JudgeExample.from_dict(json.loads(quickstart.read_text().splitlines()[0]))
    t0 = time.perf_counter()
    try:
        diffs = check_hand_over("vllm", materialize_alias("smollm2"), example)
    except AssertionError as err:
        print(f"check_vllm_handover: FAILED: {err}")
        return 1
    print(f"check_vllm_handover: ok in {time.perf_counter() - t0:.0f} s: {json.dumps(diffs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
