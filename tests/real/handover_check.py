"""The LoRA hand-over check (#25), shared by the HF test (tests/real/test_real_handover.py) and the vLLM check
(benchmarks/real/check_vllm_handover.py: out of the CI suite, since vLLM's CPU LoRA path takes ~12 s per
~500-token request here, ~30 s beyond an engine start of ~30-60 s).

After the trainer's adapter is handed to a rollout engine as the stage does it (HF: PEFT's state dict into the
engine's PEFT model; vLLM: a PEFT adapter folder served as a new LoRARequest), the engine's per-token log-probs of
a sampled CoT and its RAIL read-out equal the trainer's, in fp32, on the real SmolLM2-135M; with another adapter
the base model's differ (so the check can fail).

The trainer side is the project's training wrapper (``CotRaftCausalLM`` with ``token_logprobs=True``: the hidden
states times the lm_head, in row chunks); the engine side is the engine's own logits (HF: ``logits_to_keep`` at
the label rows; vLLM: its prompt log-probs), two different code paths over two model copies.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

# Engine vs trainer in fp32: HF's own logits agree to ~1e-6 (2e-5 allowed); vLLM's CPU kernels (its attention and
# LoRA paths) to ~1e-4 over a few hundred tokens, as its read-out does (runtime tests).
TOL = {"hf": (2e-5, 1e-4), "vllm": (2e-4, 2e-4)}


def check_hand_over(backend: str, smollm2_dir: str, example: Any) -> dict[str, float]:
    """Build the trainer (moved LoRA adapter) and a RolloutWorker (its own engine, as the stage builds one), hand
    the adapter over, sample one CoT and compare log-probs and ŷ; then require the base model (adapter off) to
    differ. Returns the measured differences."""
    from peft import get_peft_model_state_dict

    from tract_dist.config import load_config
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.loss.options import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM
    from tract_dist.real.batch import collate_samples
    from tract_dist.real.rollout import RolloutWorker
    from tract_dist.train.model_init import load_training_model

    base = {"model": {"name_or_path": smollm2_dir, "tokenizer": "smollm2",
                      "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"max_length": 512},  # the smallest the quickstart prompt fits (469 tokens)
            "real": {"max_new_tokens": 8, "temperature": 1.0, "rollout_backend": backend, "rollout_dtype": "float32"},
            "generation": {"vllm": {"kv_cache_memory_gb": 0.25, "max_model_len": 1024}}}
    cfg = load_config(None, [], base=base)
    tok = load_tokenizer("smollm2")
    trainer = load_training_model(cfg, tok, use_cuda=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a moved adapter: what the trainer holds after some updates
        for n, p in trainer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    worker = RolloutWorker(cfg.model_dump(), smollm2_dir, threads=1)
    try:
        prompt = worker.encoder.prompt_ids(example)
        handed = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer).items()}
        worker.load_adapter(handed, 1)
        s = worker.rollout([{"prompt": 0, "prompt_ids": prompt, "score": example.score, "seeds": [11]}])[0][0]
        assert s.new_tokens > 0 and any(x != -100 for x in s.labels)

        st = worker.st
        wrapper = CotRaftCausalLM(trainer, CoTRaftLossOptions(st.token_ids, st.scores, impl="fused")).eval()
        batch = collate_samples([s], [0.0], tok.pad_token_id)
        batch.pop("adv"), batch.pop("old_logprobs")
        with torch.no_grad():
            ours = wrapper(**batch, token_logprobs=True)[0]
            out = wrapper(**batch)
        mask = batch["labels"][0] != -100
        got = torch.tensor(s.old_logprobs, dtype=torch.float64)
        lp_tol, y_tol = TOL[backend]
        torch.testing.assert_close(ours[mask].double(), got[mask], rtol=0, atol=lp_tol)
        assert out.yhat[0].item() == pytest.approx(s.yhat, abs=y_tol)
        # the handed adapter matters (so the check can fail): without it (PEFT's adapter switched off: the base
        # model, what the engine would serve without the hand-over) the same CoT's log-probs differ
        with torch.no_grad(), trainer.disable_adapter():
            base_lp = wrapper(**batch, token_logprobs=True)[0]
        base_gap = (base_lp.double() - got)[mask].abs().max().item()
        assert base_gap > 1e-3
        return {"logprob_max_abs_diff": (ours[mask].double() - got[mask]).abs().max().item(),
                "yhat_abs_diff": abs(out.yhat[0].item() - s.yhat), "base_model_logprob_gap": base_gap,
                "cot_tokens": int(mask.sum())}
    finally:
        worker.close()
