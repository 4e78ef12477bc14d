"""End-to-end training on CPU: Ray Train + DeepSpeed ZeRO-3 (2 gloo workers) against plain PyTorch.

One uninterrupted Ray run is the reference for equivalence (a single plain-PyTorch process on the same
global batches), for the exported model, for the fault-tolerance and resume runs, whose final weights
must equal it, for a packed run, whose loss trajectory must equal it, and for runs resuming its step-2
checkpoint on 1 and 3 workers. Every run records the record ids each rank trained on at each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import train_fault_hooks

from tract_dist.config import ConfigError, load_config

pytestmark = [pytest.mark.slow]

STEPS, SAVE, FAIL_AT = 5, 2, 3


def _cfg(tmp: Path, data: Path, **over):
    base = {
        "model": {"name_or_path": "tiny-llama", "tokenizer": "smollm2"},
        "data": {"train_path": str(data), "train_format": "jsonl", "max_length": 768,
                 "max_examples": 16},
        "training": {"output_dir": str(tmp / "runs"), "max_steps": STEPS, "micro_batch_size": 2,
                     "gradient_accumulation_steps": 2, "learning_rate": 2e-3, "warmup_ratio": 0.2,
                     "save_steps": SAVE, "max_grad_norm": 1.0, "seed": 5},
        "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "t"},
        "cluster": {"num_workers": 2, "storage_path": str(tmp / "ray"), "max_failures": 1},
    }
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in over.items()], base=base)
    return cfg


def _export_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tract_dist.storage import verify_manifest

    verify_manifest(run_dir / "export" / "model")  # the exporter's content check (#27) matches what it wrote
    return load_file(str(run_dir / "export" / "model" / "model.safetensors"))


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def reference_run(work, quickstart_data, ray_local):
    from tract_dist.train.trainer import run_training

    cfg = _cfg(work, quickstart_data, **{"training.num_to_keep": 3})  # keeps step 2 for the elastic resumes
    with pytest.MonkeyPatch.context() as mp:
        train_fault_hooks.install(mp, "record_ids")
        return cfg, run_training(cfg, run_name="ref")


def _plain_pytorch_run(cfg, run_dir: Path, world: int):
    """The same run in one plain-PyTorch process, each step on the whole global batch (world x micro x accum):
    (losses, pre-clipping gradient norms in float64, model)."""
    from torch.optim.lr_scheduler import LambdaLR

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.loss import CoTRaftLossOptions
    from tract_dist.models import causal_lm_cot_raft_loss
    from tract_dist.train.data import StepPlan, collate, load_encoded, load_score_tokens
    from tract_dist.train.model_init import load_training_model
    from tract_dist.train.schedule import lam_at, lr_lambda

    tok = load_tokenizer("smollm2")
    model = load_training_model(cfg, tok, use_cuda=False)
    data, st = load_encoded(run_dir), load_score_tokens(run_dir)
    t = cfg.training
    plan = StepPlan(len(data), t.micro_batch_size * t.gradient_accumulation_steps * world, t.seed, t.epochs,
                    t.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = LambdaLR(opt, lr_lambda(t.lr_scheduler, plan.total_steps, t.warmup_ratio))
    losses, norms = [], []
    for step in range(plan.total_steps):
        batch = collate([data[i] for i in plan.step_indices(step).tolist()], tok.pad_token_id)
        options = CoTRaftLossOptions(st.token_ids, st.scores, lam=cfg.loss.lam, impl="reference")
        out = causal_lm_cot_raft_loss(model, batch, options, lam=lam_at(step, cfg.loss.lam, cfg.loss.lam_warmup_steps))
        opt.zero_grad()
        out.loss.backward()
        # float64: torch's fp32 norm over the 3M-element embedding gradient is off by ~6e-5 relative.
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in model.parameters()])).item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    return losses, norms, model


@pytest.mark.timeout(400)
def test_zero3_partitions_and_matches_plain_pytorch(reference_run):
    cfg, result = reference_run
    info = json.loads((result.run_dir / "train_result.json").read_text())
    total, per_rank = info["params_total"], info["params_per_rank"]
    assert len(per_rank) == 2 and all(abs(p - total / 2) / total < 0.01 for p in per_rank)

    want, want_norms, model = _plain_pytorch_run(cfg, result.run_dir, world=2)
    steps = _steps(result.run_dir)
    got = [s["loss"] for s in steps]
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([s["grad_norm"] for s in steps]), torch.tensor(want_norms),
                               rtol=2e-5, atol=1e-6)
    assert want[-1] < want[0]
    exported = _export_state(result.run_dir)
    for name, p in model.named_parameters():
        torch.testing.assert_close(exported[name], p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_inline_without_zero_matches_plain_pytorch_and_logs_grad_norm(work, quickstart_data):
    """ZeRO stage 0 in fp32: DeepSpeed clips through a plain clip_grad_norm_ and keeps no norm, so the worker
    measures it (it used to log NaN). The data carry per-record weights (stage-2 selection, #24) and λ warms
    up over 2 steps: the plain run applies both as documented (weights on each sequence's CE and squared error,
    λ = lam * step / 2), so the weights reach the loss from the JSONL through encoding and the batch."""
    from tract_dist.train.trainer import run_training

    weighted = work / "weighted.jsonl"
    rows = [json.loads(x) for x in quickstart_data.read_text().splitlines()]
    weighted.write_text("".join(json.dumps({**r, "weight": 0.25 + 0.5 * (i % 4)}) + "\n" for i, r in enumerate(rows)))
    cfg = _cfg(work / "stage0", weighted, **{"training.zero_stage": 0, "training.max_steps": 3,
                                             "training.max_grad_norm": 0.5, "cluster.num_workers": 1,
                                             "loss.lam": 0.8, "loss.lam_warmup_steps": 2})
    result = run_training(cfg, run_name="stage0", launcher="inline")
    assert json.loads((result.run_dir / "data_summary.json").read_text())["weights"]["max"] == 1.75
    want, want_norms, model = _plain_pytorch_run(cfg, result.run_dir, world=1)
    steps = _steps(result.run_dir)
    assert [s["lam"] for s in steps] == [0.0, 0.4, 0.8]  # the λ in force, logged every step
    torch.testing.assert_close(torch.tensor([s["loss"] for s in steps]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([s["grad_norm"] for s in steps]), torch.tensor(want_norms),
                               rtol=2e-5, atol=1e-6)
    assert min(want_norms) > 0.5  # clipping was active, so equal weights also check that it was applied
    exported = _export_state(result.run_dir)
    for name, p in model.named_parameters():
        torch.testing.assert_close(exported[name], p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(200)
def test_export_loads_and_gives_the_trained_models_logits(reference_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.train.model_init import load_training_model

    cfg, result = reference_run
    exported = AutoModelForCausalLM.from_pretrained(str(result.export_dir / "model")).eval()
    # The trained model, consolidated independently from the last ZeRO-3 checkpoint by DeepSpeed's tool.
    sd = get_fp32_state_dict_from_zero_checkpoint(result.checkpoint_dir)
    trained = load_training_model(cfg, load_tokenizer("smollm2"), use_cuda=False).eval()
    missing, unexpected = trained.load_state_dict({k[len("lm."):]: v for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = torch.randint(0, exported.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    tok_dir = result.export_dir / "model"
    assert (tok_dir / "tokenizer.json").exists() and (tok_dir / "config.json").exists()


@pytest.mark.timeout(500)
def test_interrupted_run_resumes_then_a_killed_worker_restarts(work, quickstart_data, reference_run, monkeypatch):
    """Both recoveries on one run folder, ending at the uninterrupted run's weights: an invocation that dies
    with no Ray retries left is resumed by the next invocation from its last checkpoint (step 2), and within
    that invocation a worker that dies is restarted by Ray from the newer checkpoint (step 4)."""
    from tract_dist.train.trainer import run_training

    train_fault_hooks.install(monkeypatch, "fail_once", after_step=FAIL_AT)
    with pytest.raises(Exception, match="injected failure"):
        run_training(_cfg(work, quickstart_data, **{"cluster.max_failures": 0}), run_name="resume")
    assert [s["step"] for s in _steps(work / "runs" / "resume")] == [1, 2, 3]
    train_fault_hooks.install(monkeypatch, "fail_once", after_step=2 * SAVE, marker=".injected_failure_2")
    result = run_training(_cfg(work, quickstart_data), run_name="resume")  # cluster.max_failures 1
    # invocation 1: steps 1-3, died; invocation 2 resumed at step 2: steps 3-4, died after the step-4
    # checkpoint; Ray restarted its workers at step 4: step 5
    assert [s["step"] for s in _steps(result.run_dir)] == [1, 2, 3] + [3, 4] + [5]
    assert json.loads((result.run_dir / "train_result.json").read_text())["start_step"] == 2 * SAVE
    ref = _export_state(reference_run[1].run_dir)
    for k, v in _export_state(result.run_dir).items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.max_steps"] == str(STEPS)
    assert run.data.metrics["loss"] > 0 and "tokens_per_s" in run.data.metrics


@pytest.mark.timeout(300)
def test_lora_with_torchrun_changes_only_adapters(work, quickstart_data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.models.tiny import deterministic_state_dict
    from tract_dist.train.model_init import load_training_model
    from tract_dist.train.trainer import run_training

    cfg = _cfg(work, quickstart_data, **{"model.lora.enabled": True, "model.lora.r": 4, "training.max_steps": 2,
                                     "training.learning_rate": 1e-2, "tracking.enabled": False})
    result = run_training(cfg, run_name="lora", launcher="torchrun")
    sd = get_fp32_state_dict_from_zero_checkpoint(result.checkpoint_dir + "/step-2")
    base = load_training_model(load_config(None, ["model.lora.enabled=false"], base=cfg.model_dump()),
                               load_tokenizer("smollm2"), use_cuda=False)
    init = deterministic_state_dict(base, seed=cfg.training.seed)
    lora_b = [k for k in sd if "lora_B" in k]
    assert lora_b and all(sd[k].abs().max() > 0 for k in lora_b)  # adapters moved from their zero init
    for k, v in sd.items():
        if "lora_" not in k:
            name = k[len("lm.base_model.model."):].replace(".base_layer.", ".")
            name = "model.embed_tokens.weight" if name == "lm_head.weight" else name  # tied
            torch.testing.assert_close(v, init[name], rtol=0, atol=0)  # base weights untouched
    adapted = PeftModel.from_pretrained(base, str(result.export_dir / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(result.export_dir / "model")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_real_smollm2_trains_a_step_and_records_its_loss_choice(work, quickstart_data):
    from transformers import AutoModelForCausalLM

    from tract_dist.train.trainer import run_training

    cfg = _cfg(work, quickstart_data, **{"model.name_or_path": "smollm2", "model.tokenizer": None,
                                     "data.max_examples": 2, "data.max_length": 768, "training.max_steps": 1,
                                     "training.micro_batch_size": 1, "training.gradient_accumulation_steps": 1,
                                     "training.learning_rate": 1e-5, "cluster.num_workers": 1,
                                     "loss.rail_normalize": True, "loss.lam": 0.5, "tracking.enabled": False})
    result = run_training(cfg, run_name="smol", launcher="inline")
    steps = _steps(result.run_dir)
    assert len(steps) == 1 and 0 < steps[0]["ce"] < 5  # a trained model, not a random one
    model = AutoModelForCausalLM.from_pretrained(str(result.export_dir / "model"))
    assert sum(p.numel() for p in model.parameters()) > 100e6
    # the run's own export writer leaves the loss choice beside the weights, which evaluation then follows
    from tract_dist.export_record import RECORD_NAME, resolve_rail_normalize

    record = json.loads((result.export_dir / "model" / RECORD_NAME).read_text())
    assert record["loss"] == {"rail_normalize": True, "lam": 0.5, "ce_on_score_token": False}
    assert resolve_rail_normalize(None, result.export_dir / "model") is True


@pytest.mark.timeout(300)
def test_packed_zero3_run_has_the_padded_runs_loss_trajectory(work, quickstart_data, reference_run, monkeypatch):
    """The reference run again with packing (one row of at most 4000 tokens per rank and step: its 4 samples,
    where the padded run makes 2 micro-batches of 2): the same samples per step, and the same losses and gradient
    norms to float32 summation-order noise, with no padding at all."""
    from tract_dist.train.trainer import run_training

    _, ref = reference_run
    train_fault_hooks.install(monkeypatch, "record_ids")
    cfg = _cfg(work, quickstart_data, **{"training.packing": True, "training.max_tokens_per_micro_batch": 4000})
    result = run_training(cfg, run_name="packed")
    got, want = _steps(result.run_dir), _steps(ref.run_dir)
    torch.testing.assert_close(torch.tensor([s["loss"] for s in got]), torch.tensor([s["loss"] for s in want]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([s["grad_norm"] for s in got]),
                               torch.tensor([s["grad_norm"] for s in want]), rtol=1e-4, atol=1e-6)
    assert all(s["pad_fraction"] == 0 for s in got) and any(s["pad_fraction"] > 0 for s in want)
    assert train_fault_hooks.seen_ids(result.run_dir) == train_fault_hooks.seen_ids(ref.run_dir)
    seen = [json.loads(x) for x in (result.run_dir / "seen-rank0.jsonl").read_text().splitlines()]
    assert [len(x["ids"]) for x in seen] == [4] * STEPS  # one packed row per step on this rank


def _checkpoint_of_step(storage: Path, step: int) -> Path:
    found = [p.parent for p in storage.glob("checkpoint_*/train_state.json")
             if json.loads(p.read_text())["step"] == step]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.timeout(600)
def test_a_two_worker_checkpoint_resumes_on_one_and_on_three_workers(work, quickstart_data, reference_run,
                                                                     monkeypatch):
    """The reference run's step-2 checkpoint (2 workers, ZeRO-3 shards) resumed on 1 worker (inline, padded
    micro-batches grouped by length) and on 3 (torchrun, packed rows of one sample: 8 samples in 9 rows, so one
    rank runs a filler): DeepSpeed's universal checkpoint carries the weights and the Adam state, the run keeps
    its global batch of 8, so steps 3-5 hold the samples they held in the uninterrupted run (each record once per
    epoch), with its losses, and the final weights equal its export to 1e-5 (1.2e-7 measured: only the order of
    float sums differs; the weights moved by up to 1e-2 in 5 steps at lr 2e-3, and Adam moments or a schedule not
    restored would show at ~1e-3)."""
    import shutil

    from tract_dist.train.trainer import run_training

    cfg, ref = reference_run
    step2 = _checkpoint_of_step(Path(cfg.cluster.storage_path) / "ref", 2)
    ref_seen, ref_steps, ref_export = train_fault_hooks.seen_ids(ref.run_dir), _steps(ref.run_dir), _export_state(
        ref.run_dir)
    train_fault_hooks.install(monkeypatch, "record_ids")
    for name, launcher, over in (
            ("to1", "inline", {"cluster.num_workers": 1, "training.group_by_length": True}),
            ("to3", "torchrun", {"cluster.num_workers": 3, "training.packing": True,
                                 "training.max_tokens_per_micro_batch": 768})):
        ckpts = work / "runs" / name / "checkpoints"
        shutil.copytree(step2, ckpts / "step-2")  # the Ray checkpoint, as the torchrun/inline layout holds it
        (ckpts / "step-2" / "COMPLETE").write_text("2")
        (ckpts / "latest").write_text("step-2")
        result = run_training(_cfg(work, quickstart_data, **over, **{"tracking.enabled": False}), run_name=name,
                              launcher=launcher)
        info = json.loads((result.run_dir / "train_result.json").read_text())
        assert (info["start_step"], info["world_size"], info["resumed_from_world_size"], info["global_batch"]) == (
            2, over["cluster.num_workers"], 2, 8)
        seen = train_fault_hooks.seen_ids(result.run_dir)
        assert seen == {s: ref_seen[s] for s in (3, 4, 5)}
        assert sorted(seen[3] + seen[4]) == sorted(str(i) for i in range(16))  # epoch 2: every record once
        assert len(set(seen[5])) == 8
        got = _steps(result.run_dir)
        assert [s["step"] for s in got] == [3, 4, 5]
        torch.testing.assert_close(torch.tensor([s["loss"] for s in got]),
                                   torch.tensor([s["loss"] for s in ref_steps[2:]]), rtol=1e-5, atol=1e-5)
        exported = _export_state(result.run_dir)
        for k, v in ref_export.items():
            torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-5, msg=f"{name}: {k}")
        assert not (result.run_dir / "universal").exists()  # the converted copy is removed once loaded


def test_bad_input_fails_before_workers_start(work, quickstart_data, ray_local, tmp_path):
    from tract_dist.train.data import EmptyDatasetError
    from tract_dist.runtime.ray_cluster import check_placement
    from tract_dist.train.trainer import run_training

    with pytest.raises(ConfigError, match="model.name_or_path: './nope' does not exist"):
        run_training(_cfg(work, quickstart_data, **{"model.name_or_path": "./nope"}), run_name="x")
    with pytest.raises(ConfigError, match="global batch of 64 samples .* exceeds the 16 training examples"):
        run_training(_cfg(work, quickstart_data, **{"training.micro_batch_size": 16}), run_name="x")
    with pytest.raises(ConfigError, match=r"cluster.num_workers=9 cannot be placed \(CPU: need 9"):
        check_placement(_cfg(work, quickstart_data, **{"cluster.num_workers": 9}).cluster)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "instruction": "i"}) + "\n")
    with pytest.raises(EmptyDatasetError, match=r"bad.jsonl: no trainable example: 1 records, 1 invalid"):
        run_training(_cfg(work, quickstart_data, **{"data.train_path": str(bad), "data.train_format": "jsonl",
                                                "data.skip_invalid": True}), run_name="x")
