"""``tract-dist plan``: a run's per-GPU memory, FLOPs and time from the model config alone (meta device, no weights,
no hub), and the check ``train``, ``pipeline`` and ``submit`` run before anything starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tract_dist.cli import main
from tract_dist.config import load_config

pytestmark = [pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
LARGE = ["qwen3-8b.yaml", "qwen3-32b.yaml", "qwen3-30b-a3b.yaml", "llama31-70b.yaml"]
GIB = 1 << 30


@pytest.fixture
def offline(monkeypatch):
    """No hub and no network: a config or file fetch, or any connection, fails the test."""
    import transformers.utils.hub as hf_hub

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"the plan tried to fetch {args[:2]}")

    def no_connect(self, *args, **kwargs):
        raise AssertionError(f"the plan opened a connection to {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_hub, "cached_files", no_fetch)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.chdir(REPO)  # the configs name configs/deepspeed/... relative to the checkout


@pytest.fixture(scope="module")
def plan_70b():
    """The 70B config's plan, made once for the module (by a test that holds the offline guard)."""
    return {}


def _plan(name: str, *overrides: str):
    from tract_dist.plan.report import plan_run

    return plan_run(load_config(REPO / "configs" / name, list(overrides)))


def test_known_shapes_build_to_the_published_parameter_counts():
    """Every built-in architecture (what the large configs plan from) builds on the meta device to the exact
    parameter total of its hub repository's safetensors: a wrong field in the table changes the count."""
    from tract_dist.plan.known import KNOWN_CONFIGS, PUBLISHED_PARAMS
    from tract_dist.plan.shape import build_meta

    from transformers import AutoConfig

    assert set(KNOWN_CONFIGS) == set(PUBLISHED_PARAMS)
    for name, fields in KNOWN_CONFIGS.items():
        fields = dict(fields)
        model = build_meta(AutoConfig.for_model(fields.pop("model_type"), **fields))
        assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == PUBLISHED_PARAMS[name], name


def test_lora_count_from_two_layers_equals_peft_on_the_whole_model(offline):
    from tract_dist.plan.shape import build_meta, lora_shape, resolve_config

    cfg = load_config(REPO / "configs" / "qwen3-8b.yaml", ["model.lora.target_modules=[q_proj,v_proj,down_proj]"])
    config, _ = resolve_config(cfg)
    assert lora_shape(build_meta(config), cfg.model.lora, config) == lora_shape(build_meta(config), cfg.model.lora)


def test_70b_config_plans_offline_from_its_shape_alone(offline, plan_70b):
    """configs/llama31-70b.yaml plans with no download; its numbers against hand arithmetic in float64."""
    plan = plan_70b.setdefault("plan", _plan("llama31-70b.yaml"))
    m = plan.model
    assert m.params == 70_553_706_496 and "built-in table" in m.source
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim, m.intermediate) == (80, 8192, 64, 8, 128, 28672)
    # LoRA r 64 on every linear layer of every decoder layer (PEFT's all-linear leaves lm_head out).
    h, kv, i, r = 8192.0, 1024.0, 28672.0, 64.0
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert plan.lora.trainable == 80 * per_layer
    stages = {s.name: s for s in plan.stages}
    assert list(stages) == ["train_stage1", "train_stage2", "generate", "evaluate"]
    train = stages["train_stage1"]
    world, largest = 32, 128256 * 8192  # the embedding (and lm_head) is the largest module
    assert train.memory.get("model states") == int(4.0 * largest + 18.0 * plan.lora.trainable / world)
    assert train.memory.get("frozen base weights") == 2 * m.params // world
    assert train.memory.get("activations (checkpoints)") == 80 * 2 * 8192 * 2 * 3000  # layer inputs, 2 x 3000 tok
    gen = stages["generate"]
    assert gen.memory.get("weights") == 2 * m.params // 4  # bf16 over tensor-parallel 4
    assert gen.figures["kv_bytes_per_token"] == 2 * 80 * 2 * 128 * 2  # K and V, 80 layers, 8 / 4 heads, bf16
    assert gen.figures["gpus"] == 32 and gen.figures["tensor_parallel"] == 4
    # FLOPs per step: frozen base 4 x P per token (forward 2, input gradients 2) plus attention and the adapters,
    # so between 4 P and 4.5 P per token; the time at the stated MFU on 32 H100s.
    tokens = 128 * 3000
    assert train.figures["tokens_per_step"] == tokens
    assert 4 * m.params * tokens * 0.95 < train.figures["flops_per_step"] < 4.5 * m.params * tokens
    assert train.figures["seconds_per_step"] == pytest.approx(train.figures["flops_per_step"] / (32 * 989.4e12 * 0.35))
    assert train.figures["steps"] == 782  # ceil(100000 / 128)
    assert all(s.verdict in ("fits", "tight") for s in plan.stages) and not plan.failing()
    assert all(s.seconds and s.seconds > 0 for s in plan.stages[:3])
    # The benchmarks are not in the checkout: their size is unknown, said so, and not guessed.
    assert stages["evaluate"].seconds is None and "benchmark sizes unknown" in " ".join(stages["evaluate"].notes)


@pytest.mark.parametrize("name", LARGE)
def test_large_configs_fit_their_nodes_and_name_their_command(offline, plan_70b, name):
    """Each shipped large config opens with the commands that run it and plans to fit on 80 GB GPUs."""
    text = (REPO / "configs" / name).read_text()
    assert any(line.startswith(f"#   tract-dist plan configs/{name}") for line in text.splitlines()[:6])
    assert f"tract-dist pipeline configs/{name}" in text
    plan = plan_70b["plan"] if name == "llama31-70b.yaml" and "plan" in plan_70b else _plan(name)
    assert plan.accelerator.memory_gib == pytest.approx(79.19)
    assert not plan.failing(), [(s.name, s.memory.total / GIB, s.notes) for s in plan.stages]
    for s in plan.stages:
        assert 0 < s.memory.total <= s.limit_bytes, (s.name, s.memory.total / GIB)


def test_plan_command_text_json_and_exit_status(offline, capsys):
    cfg = "configs/qwen3-8b.yaml"
    assert main(["plan", cfg]) == 0
    out = capsys.readouterr().out
    assert "train_stage1" in out and "projected wall-clock" in out and "assumptions:" in out
    # Full fine-tuning of 8B on one GPU does not fit: exit 1, and the JSON says why.
    assert main(["plan", cfg, "--json", "--stages", "train", "model.lora.enabled=false", "cluster.num_workers=1"]) == 1
    data = json.loads(capsys.readouterr().out)
    stage = data["stages"][0]
    assert stage["verdict"] == "does not fit" and stage["total_bytes"] > stage["limit_bytes"]
    # 8.19B x 18 B of model states alone on one GPU
    states = next(c for c in stage["components"] if c["name"] == "model states")
    assert states["bytes"] >= 18 * 8_190_735_360
    assert main(["plan", "--list-models"]) == 0 and "Qwen/Qwen3-32B" in capsys.readouterr().out


def test_train_pipeline_and_submit_refuse_a_run_that_will_not_fit(offline, monkeypatch, capsys):
    """70B full fine-tuning on 8 GPUs: about 160 GB of model states per GPU. ``train``, ``pipeline`` and ``submit``
    refuse with exit 2 before anything starts; --no-plan-check starts it; plan.check=warn only warns."""
    import tract_dist.pipeline as pipeline_mod
    import tract_dist.submit as submit
    import tract_dist.train.trainer as trainer

    started = []

    class Started(Exception):
        """Raised by the stand-ins of the run itself: the command got past its checks."""

    def stand_in(kind):
        def run(cfg, **kwargs):
            started.append(kind)
            raise Started(kind)
        return run

    monkeypatch.setattr(trainer, "run_training", stand_in("train"))
    monkeypatch.setattr(pipeline_mod, "run_pipeline", stand_in("pipeline"))

    class Client:
        def __init__(self):
            self.jobs = []

        def submit_job(self, **kwargs):
            self.jobs.append(kwargs)
            return "job-1"

    client = Client()
    monkeypatch.setattr(submit, "_client", lambda address: client)
    cfg = "configs/llama31-70b.yaml"
    big = ["model.lora.enabled=false", "cluster.num_workers=8"]

    assert main(["train", cfg, *big]) == 2
    err = capsys.readouterr().err
    assert "the run will not fit: train needs about" in err and "model states" in err and "--no-plan-check" in err
    assert "Traceback" not in err
    assert main(["pipeline", cfg, *big]) == 2
    assert "will not fit: train_stage1 and train_stage2 need about" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:1", "--no-working-dir", cfg, *big]) == 2
    assert "the run will not fit" in capsys.readouterr().err
    assert started == [] and client.jobs == []

    with pytest.raises(Started):
        main(["train", "--no-plan-check", cfg, *big])
    with pytest.raises(Started):
        main(["pipeline", cfg, "--no-plan-check", *big])
    assert started == ["train", "pipeline"]
    assert main(["submit", "--address", "http://127.0.0.1:1", "--no-working-dir", "--no-plan-check", cfg, *big]) == 0
    assert client.jobs[0]["entrypoint"].startswith(f"tract-dist pipeline --no-plan-check {cfg}")
    capsys.readouterr()
    with pytest.raises(Started):
        main(["train", cfg, *big, "plan.check=warn"])
    assert "[plan] warning: the run will not fit" in capsys.readouterr().err and started[-1] == "train"


def test_deepspeed_json_offload_and_buckets_reach_the_estimate(offline, tmp_path):
    """The run's DeepSpeed JSON sizes the plan: offloading the optimizer leaves 2 B per trainable parameter on
    the GPU (DeepSpeed's estimator), offloading parameters too only the largest layer; buckets as configured."""
    import json as _json

    base = _json.loads((REPO / "configs/deepspeed/zero3-8x80gb.json").read_text())
    plans = {}
    for name, offload in (("none", {}), ("opt", {"offload_optimizer": {"device": "cpu"}}),
                          ("all", {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme"}})):
        ds = _json.loads(_json.dumps(base))
        ds["zero_optimization"].update(offload, reduce_bucket_size=2e8)
        (tmp_path / f"{name}.json").write_text(_json.dumps(ds))
        plans[name] = _plan("qwen3-8b.yaml", f"training.deepspeed_config={tmp_path / f'{name}.json'}",
                            "model.lora.enabled=false").stages[0].memory
    p, largest, world = 8_190_735_360, 151936 * 4096, 8
    assert plans["none"].get("model states") == int(4.0 * largest + 18.0 * p / world)
    assert plans["opt"].get("model states") == int(4.0 * largest + 2.0 * p / world)
    assert plans["all"].get("model states") == 4 * largest
    assert plans["none"].get("DeepSpeed gradient bucket") == 2 * 200_000_000
    # the optimizer's temporaries on CUDA: the step's fp32 gradient and foreach AdamW's sqrt(v), one sub-group
    assert plans["none"].get("optimizer temporaries") == 2 * 4 * min(-(-p // world), 1_000_000_000)
    assert plans["opt"].get("optimizer temporaries") == 0


def test_real_method_plans_tracts_stages_and_says_train_real_is_not_planned(offline):
    """pipeline.method=real plans TRACT's stages (or none with pipeline.real_init) and evaluates one more model; the
    REAL stage itself is named as not planned rather than silently missing."""
    plain = {s.name: s for s in _plan("qwen3-8b.yaml").stages}
    real = _plan("qwen3-8b.yaml", "pipeline.method=real")
    stages = {s.name: s for s in real.stages}
    assert list(stages) == list(plain)  # stage 1, stage 2, generation, evaluation
    assert stages["evaluate"].figures["models"] == plain["evaluate"].figures["models"] + 1
    assert any("train_real" in a and "not planned" in a for a in real.assumptions)
    from_export = _plan("qwen3-8b.yaml", "pipeline.method=real", "pipeline.real_init=/tmp/any-export")
    assert [s.name for s in from_export.stages] == ["evaluate"]
    assert from_export.stages[0].figures["models"] == 1
