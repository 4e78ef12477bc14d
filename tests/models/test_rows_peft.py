"""Row selection by hand, PEFT LoRA through the hidden-state path, and the unsupported cases."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from model_test_utils import loss_from_full_logits, loss_impls, loss_options, make_batch
from peft import LoraConfig, get_peft_model

from tract_dist.models.zero3 import external_param_ids
from tract_dist.models import (
    build_tiny_model,
    causal_lm_cot_raft_loss,
    CotRaftCausalLM,
    lm_head_parameters,
    select_loss_rows,
    tiny_llama_config,
)

X = -100


def test_select_loss_rows_by_hand() -> None:
    # Example 0: labels at t=1..4; score predicted at t=2 (token at t=3 is the score token).
    # Example 1: no labels except the score token at t=4 -> only the score row (t=3) is kept.
    # Example 2: unscored (-1), labels at t=2..3.
    labels = torch.tensor([[X, 5, 6, 7, 8], [X, X, X, X, 9], [X, X, 4, 3, X]])
    rows = select_loss_rows(labels, torch.tensor([2, 3, -1]), torch.tensor([3.0, 4.5, 9.9]))
    # kept flattened rows: ex0 t=0 (->5), t=1 (->6), t=2 (score, its label 7 masked), t=3 (->8);
    # ex1 t=3 (score, label 9 masked); ex2 t=1 (->4), t=2 (->3)
    assert rows.row_index.tolist() == [0, 1, 2, 3, 8, 11, 12]
    assert rows.targets.tolist() == [5, 6, X, 8, X, 4, 3]
    assert rows.score_rows.tolist() == [2, 4]
    assert rows.score_targets.tolist() == [3.0, 4.5]


def test_select_loss_rows_rejects_bad_positions() -> None:
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        select_loss_rows(labels, torch.tensor([1, 4]), torch.zeros(2))
    with pytest.raises(ValueError):
        select_loss_rows(labels, torch.tensor([1]), torch.zeros(1))


def _lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)  # init_lora_weights=False draws both A and B at random: non-zero grads for both
    return get_peft_model(model, config)


@pytest.mark.parametrize("impl,loss_fn", loss_impls(), ids=[i for i, _ in loss_impls()])
def test_peft_lora_only_adapters_get_matching_grads(impl, loss_fn) -> None:
    base = build_tiny_model(tiny_llama_config(512, tie=True), seed=7).double()
    peft_model = _lora(base, ["q_proj", "v_proj", "down_proj"])
    ref_model = copy.deepcopy(peft_model)
    batch = make_batch(4)

    out = causal_lm_cot_raft_loss(peft_model, batch, loss_options(impl), loss_fn=loss_fn)
    out.loss.backward()
    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = loss_from_full_logits(logits, batch)
    ref.loss.backward()

    torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=1e-9, atol=1e-11)
    ref_params = dict(ref_model.named_parameters())
    n_adapter = 0
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            n_adapter += 1
            assert param.grad is not None and param.grad.abs().max() > 0, name
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-9, atol=1e-11)
        else:
            assert not param.requires_grad and param.grad is None, name
    assert n_adapter == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers


def test_lora_on_lm_head_is_rejected() -> None:
    model = _lora(build_tiny_model(tiny_llama_config(512, tie=False)), ["lm_head"])
    with pytest.raises(NotImplementedError, match="lm_head"):
        lm_head_parameters(model)


def test_head_registers_lm_head_as_zero3_external_params() -> None:
    model = build_tiny_model(tiny_llama_config(512, tie=True))
    wrapper = CotRaftCausalLM(model, loss_options())
    assert external_param_ids(wrapper.head) == {id(model.model.embed_tokens.weight)}
    assert list(wrapper.head.parameters()) == []  # the causal LM keeps ownership (no double registration)


def test_function_refuses_zero3_partitioned_head() -> None:
    model = build_tiny_model(tiny_llama_config(512, tie=False))
    model.lm_head.weight.ds_id, model.lm_head.weight.ds_status = 0, "NOT_AVAILABLE"  # looks partitioned
    with pytest.raises(RuntimeError, match="CotRaftCausalLM"):
        causal_lm_cot_raft_loss(model, make_batch(0), loss_options())


def test_head_works_where_deepspeed_is_not_installed(monkeypatch) -> None:
    # A GPU machine with plain PyTorch (no DeepSpeed): the wrapper builds and its loss equals the function's.
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed...` raises ImportError
    model = build_tiny_model(tiny_llama_config(512, tie=True)).double()
    wrapper = CotRaftCausalLM(model, loss_options())
    assert external_param_ids(wrapper.head) == set()
    batch = make_batch(5)
    torch.testing.assert_close(wrapper(**batch).loss, causal_lm_cot_raft_loss(model, batch, loss_options()).loss)
