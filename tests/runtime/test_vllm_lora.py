"""A LoRA adapter served unmerged by vLLM (LoRARequest) and by HF (PeftModel) gives the merged model's ŷ."""

from __future__ import annotations

import pytest
import torch

from tract_dist.data.prompts import SCORE_PHRASE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def adapter_and_merged(smollm2_dir, tmp_path_factory):
    """A rank-8 LoRA on every linear layer of SmolLM2 with non-zero B (a trained adapter's shape), saved as
    ``train/export.py`` saves one, and the merged model W + (alpha/r)·B·A as a float32 HF model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lora") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a small update: the adapter moves ŷ without wrecking the model
    model.save_pretrained(out)
    merged = model.merge_and_unload().eval()
    return str(out), merged


def test_unmerged_lora_equals_merged(vllm_available, adapter_and_merged, hf_engine, smollm2_dir, prompts):
    from tract_dist.data.score_tokens import derive_score_tokens
    from tract_dist.runtime.adapters import adapter_base
    from tract_dist.runtime.engine import EngineSpec
    from tract_dist.runtime.hf_engine import HFEngine, build_hf_engine, score_token_probs
    from tract_dist.runtime.sampling import SamplingParams
    from tract_dist.runtime.vllm_engine import VLLMEngine

    path, merged = adapter_and_merged
    assert adapter_base(path) == smollm2_dir
    tok = hf_engine.tokenizer
    st = derive_score_tokens(tok, (1, 5))
    suffix = tok.encode(f" Fine. {SCORE_PHRASE} 1", add_special_tokens=False)[:-1]
    seqs = [p + suffix for p in prompts[:2]]

    def yhat(probs):
        return [sum(k * q for k, q in zip(st.scores, row)) for row in probs]

    ref = yhat(score_token_probs(merged, seqs, st.token_ids, pad_id=tok.pad_token_id))
    base = yhat(hf_engine.score_probs(seqs, st.token_ids))
    assert max(abs(a - b) for a, b in zip(ref, base)) > 1e-3  # the adapter really changes the scores
    peft_hf = build_hf_engine(EngineSpec(backend="hf", model_path=path, dtype="float32"))
    assert type(peft_hf.model).__name__ == "PeftModel"  # unmerged
    assert yhat(peft_hf.score_probs(seqs, st.token_ids)) == pytest.approx(ref, abs=1e-5)
    engine = VLLMEngine(EngineSpec(backend="vllm", model_path=path, torch_threads=2))  # outside the cache
    try:
        assert engine.lora_request is not None
        assert yhat(engine.score_probs(seqs, st.token_ids)) == pytest.approx(ref, abs=1e-4)
        lora_text = engine.generate(prompts[:1], [0], SamplingParams(temperature=0.0, max_new_tokens=6))[0].text
        merged_hf = HFEngine(merged, tok)
        assert lora_text == merged_hf.generate(prompts[:1], [0], SamplingParams(temperature=0.0, max_new_tokens=6))[0].text
    finally:
        engine.close()
