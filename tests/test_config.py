import pytest

from tract_dist.cli import main
from tract_dist.config import ConfigError, load_config

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_errors_name_file_and_dotted_key(tmp_path):
    p = _write(tmp_path, "model:\n  name_or_path: m\ntraining:\n  learning_rate: fast\n  bogus: 1\nloss:\n  lam: -1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert f"{p}: training.learning_rate: Input should be a valid number" in msg
    assert f"{p}: training.bogus: unknown key" in msg
    assert f"{p}: loss.lam: Input should be greater than or equal to 0" in msg


def test_missing_required_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"model: required value is missing"):
        load_config(_write(tmp_path, "data:\n  max_length: 512\n"))
    with pytest.raises(ConfigError, match=r"modle: unknown key"):
        load_config(_write(tmp_path, "modle:\n  name_or_path: x\nmodel:\n  name_or_path: x\n"))
    with pytest.raises(ConfigError, match=r"model.lora.r: Input should be greater than 0"):
        load_config(_write(tmp_path, "model:\n  name_or_path: x\n  lora:\n    r: 0\n"))


def test_yaml_is_parsed_safely(tmp_path):
    p = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides(tmp_path):
    p = _write(tmp_path, "model:\n  name_or_path: m\n")
    cfg = load_config(p, ["training.learning_rate=3e-4", "model.lora.enabled=true", "cluster.num_workers=2",
                          "generation.stop=[a, b]", "model.tokenizer=llama3"])
    assert cfg.training.learning_rate == 3e-4 and cfg.model.lora.enabled is True
    assert cfg.cluster.num_workers == 2 and cfg.generation.stop == ["a", "b"] and cfg.model.tokenizer == "llama3"
    assert cfg.flat()["training.learning_rate"] == 3e-4
    with pytest.raises(ConfigError, match=r"\(\+ overrides\): training.lr: unknown key"):
        load_config(p, ["training.lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["training.lr"])
    with pytest.raises(ConfigError, match=r"'model.name_or_path' is not a section"):
        load_config(p, ["model.name_or_path.x=1"])


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_cli_overrides_for_every_command(tmp_path, capsys):
    p = _write(tmp_path, "model:\n  name_or_path: llama3\n")
    assert main(["config", "show", str(p), "data.scale=1-10"]) == 0
    assert "scale: 1-10" in capsys.readouterr().out
    assert main(["score-tokens", "--config", str(p), "data.scale=1-10"]) == 0
    assert '"token_ids": [16, 17, 18, 19, 20, 21, 22, 23, 24, 605]' in capsys.readouterr().out
    assert main(["score-tokens", "--tokenizer", "llama3", "data.bogus=1"]) == 2
    assert "data.bogus: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("family,batch,epochs,lam", [("mistral-7b", 8, 2, 0.125), ("llama31-8b", 4, 1, 0.25)])
def test_paper_configs_hold_the_official_settings(family, batch, epochs, lam):
    """configs/paper-*.yaml as the official code ran them (../shared/FIDELITY.md, d223302/TRACT at dcb7a64), and
    the -packed variants identical but for the settings their header argues for."""
    cfg = load_config(REPO_CONFIGS / f"paper-{family}.yaml")
    m, d, t, g, e = cfg.model, cfg.data, cfg.training, cfg.generation, cfg.evaluation
    assert (m.lora.enabled, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules) == (
        True, 8, 16, 0.0, "all-linear")
    assert (d.system_prompt, d.max_length, cfg.loss.lam, cfg.loss.rail_normalize) == (None, 3000, lam, False)
    assert (t.epochs, t.micro_batch_size, t.gradient_accumulation_steps, t.learning_rate, t.lr_scheduler,
            t.warmup_ratio, t.packing, t.global_batch_size) == (epochs, batch, 1, 1e-5, "cosine", 0.1, False, None)
    assert (g.temperature, g.top_p, g.repetition_penalty, g.max_new_tokens, g.seed, g.num_cots, g.max_length) == (
        1.0, 0.9, 1.03, 1024, 42, 1, 4900)
    assert set(g.stop) == {"[RESULT]", "So the overall"}
    assert (e.num_cots, e.sample_single_cot, e.mode) == (1, True, "cot_rail")
    from tract_dist.generate.pipeline import inference_max_length
    from tract_dist.judge.judge import judge_kwargs

    judge = judge_kwargs(cfg.data, cfg.generation, cfg.evaluation, rail_normalize=False)  # evaluation's and serving's
    assert (judge["system_prompt"], judge["max_length"], judge["sample_single_cot"]) == (None, 4900, True)
    assert inference_max_length(cfg.generation, cfg.data) == 4900 and judge["sampling"].repetition_penalty == 1.03
    faster = load_config(REPO_CONFIGS / f"paper-{family}-packed.yaml").flat()
    differs = {k for k, v in cfg.flat().items() if faster[k] != v}
    assert differs == {"training.packing", "training.max_tokens_per_micro_batch", "training.global_batch_size"}
    assert faster["training.global_batch_size"] == batch * cfg.cluster.num_workers  # the same steps on 8 GPUs


def test_layout_and_elastic_settings_are_checked(tmp_path):
    p = _write(tmp_path, "model:\n  name_or_path: m\n")
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch \(1000\) must be at least data.max_length"):
        load_config(p, ["training.packing=true", "training.max_tokens_per_micro_batch=1000"])
    with pytest.raises(ConfigError, match="cluster.min_workers .* needs training.global_batch_size"):
        load_config(p, ["cluster.min_workers=2", "cluster.num_workers=4"])
    with pytest.raises(ConfigError, match=r"cluster.min_workers \(5\) must not exceed cluster.num_workers \(4\)"):
        load_config(p, ["cluster.min_workers=5", "cluster.num_workers=4", "training.global_batch_size=8"])
    cfg = load_config(p, ["cluster.min_workers=2", "cluster.num_workers=4", "training.global_batch_size=8",
                          "cluster.elastic_resize_interval_s=5"])
    from tract_dist.train.trainer import scaling_config

    sc = scaling_config(cfg)  # Ray Train V2's elastic range for TorchTrainer
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (2, 4)
    assert sc.elastic_resize_monitor_interval_s == 5
    assert not scaling_config(load_config(p)).elasticity_enabled
