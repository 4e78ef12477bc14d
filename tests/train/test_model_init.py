"""The model a worker fine-tunes is in training mode, so gradient checkpointing and dropout take effect."""

from __future__ import annotations

import pytest
import torch

from tract_dist.config import load_config


@pytest.mark.timeout(300)
def test_a_pretrained_model_trains_with_checkpointing_and_dropout_on(tiny_export):
    """from_pretrained returns eval mode: without train() transformers skips the recomputation and LoRA's
    dropout is the identity, whatever the config says. Checked by what autograd keeps from a forward."""
    from tract_dist.data.assets import load_tokenizer
    from tract_dist.train.model_init import load_training_model

    cfg = load_config(None, [f"model.name_or_path={tiny_export}", "model.gradient_checkpointing=true",
                             "model.lora.enabled=true", "model.lora.dropout=0.5", "model.dtype=float32"])
    model = load_training_model(cfg, load_tokenizer(tiny_export), use_cuda=False)
    assert all(m.training for m in model.modules())
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def keep(t):
        if t.data_ptr() not in weights:  # activations, not the weights matmuls save
            saved.append(t.numel())
        return t

    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids)
    # Checkpointed: about one (64 x hidden 64) input per layer (2), not each layer's dozens of saved tensors.
    assert sum(saved) < 4 * 2 * 64 * 64, sum(saved)
    # Dropout acts: two forwards of the same input differ (once the adapters' zero-initialised B is not zero).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
