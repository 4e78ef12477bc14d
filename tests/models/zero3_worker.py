"""torchrun worker for test_zero3.py: one ZeRO-3 CoT-RAFT step on a tiny Llama per (tie, impl) case.

Every rank runs the same cases on its own micro-batch; rank 0 writes the consolidated results
(loss, full gradients, post-step weights, partition sizes) to ``<out>/<case>.pt`` for the test to
compare with a plain single-process run. Run as a script (``torchrun ... tests/models/zero3_worker.py``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from model_test_utils import loss_options, make_batch
from transformers.integrations import HfDeepSpeedConfig

from tract_dist.loss import cot_raft_loss_with_options
from tract_dist.models import CotRaftCausalLM, build_tiny_model, select_loss_rows, tiny_llama_config
from tract_dist.train.data import loss_denominators

SEED = 11
MICRO_BATCH = 2
# eps 1e-6 (not 1e-8): Adam's first step is lr * g / (|g| + eps), whose sensitivity to fp32 noise in
# a near-zero gradient is lr * noise / eps; with 1e-8 one element with |g| ~ 4e-9 moved 4% of lr.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.01)


def ds_config(world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_clipping": 0.0,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # partition even tiny params: the test is about partitioning
            "stage3_model_persistence_threshold": 0,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {**ADAMW, "betas": list(ADAMW["betas"]), "torch_adam": True},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def rank_batch(rank: int) -> dict:
    return make_batch(100 + rank, batch=MICRO_BATCH)


def global_counts(batch: dict) -> tuple[float, float]:
    """CE-token and score-row counts summed over ranks (what the trainer all-reduces)."""
    rows = select_loss_rows(batch["labels"], batch["score_positions"], batch["score_targets"])
    counts = torch.tensor([(rows.targets != -100).sum(), rows.score_rows.numel()], dtype=torch.float64)
    dist.all_reduce(counts)
    return float(counts[0]), float(counts[1])


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA on attention and MLP (random A and B, same on every rank and in the plain run)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def run_case(tie: bool, impl: str, lora: bool, out: Path, rank: int, world: int) -> None:
    config = ds_config(world)
    hf_ds = HfDeepSpeedConfig(config)  # noqa: F841 - must stay alive while the model is built
    base = build_tiny_model(tiny_llama_config(512, tie=tie), seed=SEED)
    assert all(hasattr(p, "ds_id") for p in base.parameters()), "model was not born partitioned"
    head, embed = base.lm_head.weight, base.model.embed_tokens.weight
    assert (head is embed) == tie
    resident_after_build = sum(p.data.numel() for p in base.parameters())
    model = with_lora(base) if lora else base

    available_at_loss: list[int] = []
    head_status_in_decoder: list[str] = []
    base.model.layers[-1].register_forward_hook(lambda *_: head_status_in_decoder.append(head.ds_status.name))

    def observed_loss(*args, **kwargs):
        # What is gathered while the loss runs: must be the lm_head weight only.
        available_at_loss.append(sum(p.ds_numel for p in params if p.ds_status.name == "AVAILABLE"))
        return cot_raft_loss_with_options(*args, **kwargs)

    wrapper = CotRaftCausalLM(
        model, loss_options(impl), loss_fn=observed_loss
    )
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=wrapper, model_parameters=trainable, config=config)
    params = list(model.parameters())  # LoRA parameters are partitioned by deepspeed.initialize
    local_numel = torch.tensor([sum(p.ds_tensor.numel() for p in params)])
    all_local = [torch.zeros_like(local_numel) for _ in range(world)]
    dist.all_gather(all_local, local_numel)
    total_numel = sum(p.ds_numel for p in params)

    batch = rank_batch(rank)
    ce_count, score_count = global_counts(batch)
    # The trainer's rule: global counts, divided by the world size (DeepSpeed averages gradients over ranks).
    den = loss_denominators(int(ce_count), int(score_count), ce_on_score_token=loss_options(impl).ce_on_score_token,
                            world_size=world)
    result = engine(**batch, **den.per_rank())
    engine.backward(result.loss)
    local_grad_left = sum(0 if p.grad is None else p.grad.numel() for p in params)
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    resident_after_backward = sum(p.data.numel() for p in params)
    engine.step()
    resident_after_step = sum(p.data.numel() for p in params)

    weights = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.data.detach().clone()

    loss = result.loss.detach().double().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save(
            {
                "loss": loss / world,  # mean over ranks of world * local part = the global-batch loss
                "grads": grads,
                "weights": weights,
                "local_numel": [int(x) for x in all_local],
                "total_numel": total_numel,
                "head_numel": head.ds_numel,
                "available_at_loss": available_at_loss,
                "head_status_in_decoder": head_status_in_decoder,
                "resident_after_build": resident_after_build,
                "resident_after_backward": resident_after_backward,
                "resident_after_step": resident_after_step,
                "local_grad_left": local_grad_left,
            },
            out / case_file(tie, impl, lora),
        )
    engine.destroy()
    dist.barrier()


def case_file(tie: bool, impl: str, lora: bool) -> str:
    return f"tie{int(tie)}-{impl}{'-lora' if lora else ''}.pt"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="1:fused,0:fused,1:reference,0:reference,1:fused:lora")
    args = parser.parse_args()
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in args.cases.split(","):
        tie, impl, *lora = case.split(":")
        run_case(bool(int(tie)), impl, lora == ["lora"], args.out, rank, world)
    dist.barrier()
    if rank == 0:
        (args.out / "done").write_text(os.environ.get("WORLD_SIZE", "?"))
    dist.destroy_process_group()  # without it gloo threads can abort the process at exit


if __name__ == "__main__":
    main()
