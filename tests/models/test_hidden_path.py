"""The hidden-state path equals HF's logits path: values, loss and every parameter's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from model_test_utils import (
    grads,
    loss_from_full_logits,
    loss_impls,
    loss_options,
    make_batch,
    split_options,
)
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tract_dist.models import (
    CotRaftCausalLM,
    build_tiny_model,
    causal_lm_cot_raft_loss,
    final_hidden_states,
    lm_head_parameters,
    tiny_llama_config,
)
from tract_dist.models.tiny import fill_deterministic_

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _model(kind: str) -> torch.nn.Module:
    if kind == "llama-tied":
        return build_tiny_model(tiny_llama_config(512, tie=True), seed=1)
    if kind == "llama-untied":
        return build_tiny_model(tiny_llama_config(512, tie=False), seed=2)
    if kind == "llama-head-bias":  # no HF family has an lm_head bias; swap one in to cover the bias path
        model = build_tiny_model(tiny_llama_config(512, tie=False), seed=3)
        model.lm_head = torch.nn.Linear(64, 512, bias=True)
        fill_deterministic_(model.lm_head, seed=4)
        return model
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=512, tie_word_embeddings=False, **SMALL))
    elif kind == "qwen2-tied":  # qkv biases
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, tie_word_embeddings=True, **SMALL))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    fill_deterministic_(model, seed=5)
    return model


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "llama-head-bias", "mistral", "qwen2-tied"])
def test_hidden_times_head_equals_hf_logits(kind: str) -> None:
    model = _model(kind).double().eval()
    batch = make_batch(0)
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
        weight, bias = lm_head_parameters(model)
        ours = hidden @ weight.T + (bias if bias is not None else 0.0)
    assert (bias is not None) == (kind == "llama-head-bias")
    if kind.endswith("tied") and "untied" not in kind:
        assert weight is model.get_input_embeddings().weight
    torch.testing.assert_close(ours, hf, rtol=1e-12, atol=1e-12)


OPTIONS = {
    "defaults": dict(),
    "rail-ce-score-globaldenoms": dict(
        lam=0.5, rail_normalize=True, ce_on_score_token=True, ce_denominator=57.0, mse_denominator=5.0
    ),
}


@pytest.mark.parametrize("impl,loss_fn", loss_impls(), ids=[i for i, _ in loss_impls()])
@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "llama-head-bias"])
def test_loss_and_grads_equal_full_logits_reference(kind, dtype, options, impl, loss_fn) -> None:
    """Our path (dtype) vs HF logits -> per-example float64 loss on a float64 copy of the same model."""
    base = _model(kind)
    batch = make_batch(1, with_unscored=True)
    opts = OPTIONS[options]

    ref_model = copy.deepcopy(base).double()
    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = loss_from_full_logits(logits, batch, **opts)
    ref.loss.backward()
    ref_grads = grads(ref_model)

    model = copy.deepcopy(base).to(dtype)
    settings, calls = split_options(opts)
    out = causal_lm_cot_raft_loss(model, batch, loss_options(impl, **settings), loss_fn=loss_fn, **calls)
    out.loss.backward()

    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), **tol)
    torch.testing.assert_close(out.ce.double(), ref.ce.detach(), **tol)
    torch.testing.assert_close(out.mse.double(), ref.mse.detach(), **tol)
    torch.testing.assert_close(out.yhat.double(), ref.yhat.detach(), **tol)
    ours = grads(model)
    assert ours.keys() == ref_grads.keys()
    for name, g in ours.items():
        assert g is not None, name
        assert ref_grads[name].abs().max() > 0, name  # every parameter is exercised
        torch.testing.assert_close(g.double(), ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")


def test_tied_head_gradient_is_sum_of_embedding_and_head_uses() -> None:
    """Tied weight grad == embedding grad + lm_head grad of the same model with the two untied."""
    tied = _model("llama-tied").double()
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    batch = make_batch(2)
    impl, loss_fn = loss_impls()[0]
    causal_lm_cot_raft_loss(tied, batch, loss_options(impl), loss_fn=loss_fn).loss.backward()
    causal_lm_cot_raft_loss(untied, batch, loss_options(impl), loss_fn=loss_fn).loss.backward()
    embed_use, head_use = untied.model.embed_tokens.weight.grad, untied.lm_head.weight.grad
    assert embed_use.abs().sum() > 1e-3 and head_use.abs().sum() > 1e-3  # both uses contribute
    torch.testing.assert_close(tied.lm_head.weight.grad, embed_use + head_use, rtol=1e-10, atol=1e-12)


def test_wrapper_module_matches_function() -> None:
    model = _model("llama-untied").double()
    batch = make_batch(3)
    impl, loss_fn = loss_impls()[0]
    direct = causal_lm_cot_raft_loss(model, batch, loss_options(impl), loss_fn=loss_fn, ce_denominator=40.0)
    wrapper = CotRaftCausalLM(model, loss_options(impl), loss_fn=loss_fn)
    wrapped = wrapper(**batch, ce_denominator=40.0)
    torch.testing.assert_close(wrapped.loss, direct.loss, rtol=0, atol=0)
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in model.parameters()]
